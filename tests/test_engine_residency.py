"""Page-cache residency as the engine probes it (sampled for large ranges) against a full mincore scan."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flashtensors.engine.sysio import PAGE, RESIDENCY_SAMPLES, RESIDENCY_WINDOW, Mapping, buffer_at, residency
from helpers.compare import cached_fraction, drop_from_cache

MiB = 1024 * 1024


@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    """A file large enough to be sampled rather than scanned."""
    path = tmp_path / "big.bin"
    size = RESIDENCY_SAMPLES * RESIDENCY_WINDOW * PAGE * 8
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    return path


def _drop_range(path: Path, start: int, length: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_fully_cached_file_reads_as_warm(big_file: Path) -> None:
    big_file.read_bytes()
    size = big_file.stat().st_size
    assert cached_fraction(big_file) == 1.0
    assert residency(big_file, 0, size) == 1.0


def test_dropped_file_reads_as_cold(big_file: Path) -> None:
    if not drop_from_cache(big_file):
        pytest.skip("this filesystem keeps the pages (cannot make a file cold here)")
    assert residency(big_file, 0, big_file.stat().st_size) < 0.05


def test_sample_tracks_full_scan(big_file: Path) -> None:
    big_file.read_bytes()
    size = big_file.stat().st_size
    _drop_range(big_file, size // 2, size - size // 2)  # second half out of the cache
    full = cached_fraction(big_file)
    if full is None or full > 0.55:
        pytest.skip("this filesystem keeps the pages (cannot make half a file cold here)")
    sampled = residency(big_file, 0, size)
    assert abs(sampled - full) < 0.05, (sampled, full)


def test_small_range_is_scanned_exactly(tmp_path: Path) -> None:
    path = tmp_path / "small.bin"
    path.write_bytes(os.urandom(32 * MiB))  # under the sampling threshold
    path.read_bytes()
    _drop_range(path, 16 * MiB, 16 * MiB)
    full = cached_fraction(path)
    if full is None or full > 0.8:
        pytest.skip("this filesystem keeps the pages")
    with Mapping(path, 32 * MiB) as m:
        assert m.resident_fraction() == full


@pytest.mark.parametrize("huge", [False, True])
def test_anonymous_memory_is_faulted_in_only_when_asked(huge: bool) -> None:
    """The staging ring maps its memory unpopulated, so each slot is faulted in by its first user."""
    size = 8 * 1024 * 1024
    lazy = Mapping(None, size, huge=huge, populate=False)
    eager = Mapping(None, size, huge=huge)
    try:
        assert lazy.resident_fraction() == 0.0
        if eager.resident_fraction() < 1.0:
            pytest.skip("this kernel refused MADV_POPULATE_WRITE / MAP_POPULATE")
        buffer_at(lazy.address, size)[: 2 * 1024 * 1024] = b"\1" * (2 * 1024 * 1024)  # touch a quarter
        assert 0.0 < lazy.resident_fraction() < 1.0
    finally:
        lazy.close()
        eager.close()
