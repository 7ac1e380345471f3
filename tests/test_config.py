"""Settings from the environment: a value out of range names the FLASH_* variable the user set."""

from __future__ import annotations

import pytest

import flashtensors as ft
from flashtensors.config import get_settings, reset_settings
from flashtensors.errors import ConfigError


@pytest.mark.parametrize(
    ("env", "value", "field"),
    [
        ("FLASH_WARM_RING_THREADS", "-1", "warm_ring_threads"),
        ("FLASH_IO_THREADS", "0", "io_threads"),
        ("FLASH_CHUNK_SIZE", "1G", "ring_size auto needs two chunks in at most 1G, and chunk_size is 1G"),
        ("FLASH_RING_SIZE", "10M", "(got 10M with chunk_size 16M): set ring_size between 32M and 1G"),
        ("FLASH_READ_SIZE", "6000", "read_size must be auto or a multiple of 4096"),
        ("FLASH_READ_SIZE", "32M", "no larger than chunk_size"),
    ],
)
def test_an_out_of_range_variable_is_named(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, field: str
) -> None:
    monkeypatch.setenv(env, value)
    reset_settings()
    with pytest.raises(ConfigError) as info:
        get_settings()
    assert info.value.message.startswith(f"{env}={value}: ")
    assert field in info.value.message and "flash --help" in info.value.hint


def test_an_unparsable_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASH_WARM_RING_THREADS", "many")
    reset_settings()
    with pytest.raises(ConfigError, match="FLASH_WARM_RING_THREADS: not an integer"):
        get_settings()


def test_configure_names_the_keyword(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLASH_WARM_RING_THREADS", raising=False)
    reset_settings()
    with pytest.raises(ConfigError) as info:
        ft.configure(warm_ring_threads=-2)
    assert info.value.message == "warm_ring_threads must be 0 (pin only) or more"
    assert ft.configure(warm_ring_threads=0).warm_ring_threads == 0


def test_a_setting_that_takes_auto_says_so_when_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASH_RING_SIZE", "lots")
    reset_settings()
    with pytest.raises(ConfigError) as info:
        get_settings()
    assert info.value.message.startswith("FLASH_RING_SIZE: not a size: 'lots'")
    assert info.value.message.endswith(", or auto")


def test_read_size_takes_auto_and_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    for text, want in (("auto", 0), ("512K", 512 * 1024), ("16M", 16 * 1024 * 1024)):
        monkeypatch.setenv("FLASH_READ_SIZE", text)
        reset_settings()
        assert get_settings().read_size == want
