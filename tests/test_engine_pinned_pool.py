"""The RAM tier's bookkeeping on CPU: pins are given back exactly once, and never while a load still
reads them. cudaHostRegister is replaced by a recorder (no GPU here); the GPU tests check the DMA."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import flashtensors as ft
from flashtensors.engine import devices, pinned
from helpers.stfile import build, random_spec, write


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch) -> dict[int, int]:
    """Registered address -> times registered; unregistering an address not registered fails."""
    live: dict[int, int] = {}

    def register(address: int, nbytes: int) -> None:
        live[address] = live.get(address, 0) + 1

    def unregister(address: int) -> None:
        assert live.get(address), f"unregistered {address:#x}, which is not registered"
        live[address] -= 1
        if not live[address]:
            del live[address]

    monkeypatch.setattr(devices, "host_register", register)
    monkeypatch.setattr(devices, "host_unregister", unregister)
    yield live
    pinned.unpin()
    assert not live, "pins left behind"


@pytest.fixture
def model(tmp_path: Path) -> Path:
    ft.configure(mem_pool_size=1 << 30)
    return write(tmp_path / "m.safetensors", build([random_spec("w", "F32", (50_000,), 7)]))


def test_unpin_waits_for_the_load_reading_it(driver: dict[int, int], model: Path) -> None:
    ft.pin(model)
    entry = pinned.acquire(model)
    assert entry is not None and driver
    ft.unpin(model)
    assert pinned.lookup(model) is None  # out of the pool at once ...
    assert driver and entry.mapping.address  # ... but still pinned and mapped for the reader
    pinned.release([entry])
    assert not driver and entry.mapping.address == 0


def test_unpin_without_readers_releases_at_once(driver: dict[int, int], model: Path) -> None:
    ft.pin(model)
    ft.unpin()
    assert not driver
    assert pinned.acquire(model) is None


def test_two_readers_the_last_one_releases(driver: dict[int, int], model: Path) -> None:
    ft.pin(model)
    a, b = pinned.acquire(model), pinned.acquire(model)
    assert a is b is not None
    ft.unpin(model)
    pinned.release([a])
    assert driver
    pinned.release([b])
    assert not driver


def test_a_changed_file_is_not_served_and_its_reader_keeps_the_old_pins(
    driver: dict[int, int], model: Path
) -> None:
    ft.pin(model)
    reading = pinned.acquire(model)
    assert reading is not None
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # the file "changed"
    assert pinned.acquire(model) is None
    assert driver  # the first reader's pins stay until it is done
    pinned.release([reading])
    assert not driver
    ft.pin(model)  # pinning it again works, and is released by the fixture's unpin
    assert pinned.lookup(model) is not None
