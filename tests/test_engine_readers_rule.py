"""The cold path's sizes by load: reader threads from the load's cold bytes, and a staging ring with two
slots per reader that grows, once per process, for the widest load seen (``io_threads`` and
``ring_size`` auto). Fixed values still win."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import flashtensors as ft
from flashtensors.config import get_settings, reset_settings
from flashtensors.engine import readers
from flashtensors.engine.api import load
from helpers.compare import assert_same, reference_load

KiB = 1024


def test_auto_is_the_default_and_a_word_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = get_settings()
    assert (settings.io_threads, settings.ring_size) == (0, 0)
    monkeypatch.setenv("FLASH_IO_THREADS", "auto")
    monkeypatch.setenv("FLASH_RING_SIZE", "AUTO")
    reset_settings()
    assert (get_settings().io_threads, get_settings().ring_size) == (0, 0)
    monkeypatch.setenv("FLASH_IO_THREADS", "12")
    monkeypatch.setenv("FLASH_RING_SIZE", "384M")
    reset_settings()
    assert (get_settings().io_threads, get_settings().ring_size) == (12, 384 * 1024**2)


def test_readers_by_cold_bytes() -> None:
    settings = get_settings()
    assert readers.cold_readers(settings, readers.BIG_LOAD - 1) == readers.SMALL_READERS
    assert readers.cold_readers(settings, readers.BIG_LOAD) == readers.BIG_READERS
    fixed = ft.configure(io_threads=5)
    assert readers.cold_readers(fixed, 100 * readers.BIG_LOAD) == 5


@pytest.fixture
def no_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's staging ring forgotten for the test (an earlier test may have grown one)."""
    monkeypatch.setattr(readers, "_rings", {})


def test_auto_ring_grows_for_more_readers_and_keeps_the_largest(no_ring: None) -> None:
    settings = ft.configure(chunk_size=64 * KiB)
    small = readers.staging_ring(settings, 8)
    assert len(small.slots) == readers.RING_MIN_SLOTS  # two per reader, never under the floor
    wide = readers.staging_ring(settings, 16)
    assert wide is not small and len(wide.slots) == 32
    assert readers.staging_ring(settings, 8) is wide  # a smaller load reuses the larger ring
    assert readers.staging_ring(settings) is wide  # so do the warm and buffered paths
    assert all(s.offset == i * 64 * KiB for i, s in enumerate(wide.slots))


def test_auto_ring_is_at_most_one_gib() -> None:
    settings = ft.configure(chunk_size=128 * 1024**2)
    assert readers.ring_slots(settings, 16) == 8  # 1 GiB of 128 MiB slots, not 32


def test_a_fixed_ring_size_does_not_grow(no_ring: None) -> None:
    settings = ft.configure(chunk_size=64 * KiB, ring_size=320 * KiB)
    ring = readers.staging_ring(settings, 16)
    assert len(ring.slots) == 5
    assert readers.staging_ring(settings, 64) is ring


def _count_readers(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record how many threads each gated start asks for (the readers of one pass)."""
    counts: list[int] = []
    real = readers.start_gated

    def counted(
        count: int, target: Callable[[], None], name: str
    ) -> tuple[list[threading.Thread], threading.Event]:
        counts.append(count)
        return real(count, target, name)

    monkeypatch.setattr(readers, "start_gated", counted)
    return counts


@pytest.mark.parametrize(("big_load", "io_threads", "expected"), [(None, 0, 8), (1, 0, 16), (1, 3, 3)])
def test_a_direct_cpu_load_takes_the_readers_the_rule_gives(
    ring_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    big_load: int | None,
    io_threads: int,
    expected: int,
) -> None:
    """A ~3 MB file in 64 KiB chunks has more chunks than readers, so the pass starts exactly the rule's
    count; the bytes are the reference's either way."""
    if big_load is not None:
        monkeypatch.setattr(readers, "BIG_LOAD", big_load)
    ft.configure(chunk_size=64 * KiB, io_threads=io_threads)
    counts = _count_readers(monkeypatch)
    result = load(ring_file, read_path="direct")
    assert_same(result.tensors, reference_load(ring_file))
    if set(result.stats.paths.values()) != {"direct"}:
        pytest.skip("this filesystem refuses O_DIRECT (the buffered path uses cpu_threads)")
    assert counts == [expected]
