"""Each read path forced on its own gives the reference bytes: buffered, direct, pinned-mmap, auto.

The ring tests shrink the staging ring (64 KiB chunks, 256 KiB ring) so a ~3 MB file wraps it many times,
tensors straddle chunk edges and one tensor is four rings long.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
import torch

import flashtensors as ft
from flashtensors.engine.api import load, load_file, load_state_dict
from flashtensors.errors import ConfigError
from helpers.compare import assert_same, drop_from_cache, reference_load
from helpers.nodirect import NoDirect

PATHS = ["buffered", "direct", "pinned-mmap", "auto"]
CONCRETE = {"direct", "pinned-mmap", "buffered"}
KiB = 1024


def _direct_works(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


@pytest.fixture
def small_ring() -> None:
    ft.configure(chunk_size=64 * KiB, ring_size=256 * KiB)


@pytest.mark.parametrize("read_path", PATHS)
def test_every_dtype(all_dtypes_file: Path, read_path: str) -> None:
    assert_same(load_state_dict(all_dtypes_file, read_path=read_path), reference_load(all_dtypes_file))


@pytest.mark.parametrize("read_path", PATHS)
def test_misaligned(misaligned_file: Path, read_path: str) -> None:
    assert_same(load_state_dict(misaligned_file, read_path=read_path), reference_load(misaligned_file))


@pytest.mark.parametrize("read_path", PATHS)
def test_shards(index_dir: Path, read_path: str) -> None:
    assert_same(load_state_dict(index_dir, read_path=read_path), reference_load(index_dir))


@pytest.mark.parametrize("read_path", PATHS)
def test_file_larger_than_ring(ring_file: Path, small_ring: None, read_path: str) -> None:
    assert ring_file.stat().st_size > 10 * ft.get_settings().ring_size
    assert_same(load_state_dict(ring_file, read_path=read_path), reference_load(ring_file))


@pytest.mark.parametrize("read_path", PATHS)
def test_cold_file_larger_than_ring(
    ring_file: Path, tmp_path: Path, small_ring: None, read_path: str
) -> None:
    """The same, with the file out of the page cache first (the case O_DIRECT exists for)."""
    cold = tmp_path / "cold.safetensors"
    shutil.copyfile(ring_file, cold)
    if not drop_from_cache(cold):
        pytest.skip("this filesystem keeps the file cached (cannot make it cold)")
    assert_same(load_state_dict(cold, read_path=read_path), reference_load(ring_file))


@pytest.mark.parametrize("read_path", PATHS)
def test_read_path_from_settings(misaligned_file: Path, read_path: str) -> None:
    """configure(read_path=...) applies to load_file, which has no read_path argument."""
    ft.configure(read_path=read_path)
    assert_same(load_file(misaligned_file), reference_load(misaligned_file))


def test_read_path_from_environment(ring_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASH_READ_PATH", "buffered")
    ft.config.reset_settings()
    result = load(ring_file)
    assert_same(result.tensors, reference_load(ring_file))
    assert set(result.stats.paths.values()) == {"buffered"}


def test_forced_buffered_is_reported(index_dir: Path) -> None:
    result = load(index_dir, read_path="buffered")
    assert set(result.stats.paths.values()) == {"buffered"}


def test_forced_direct_is_used_where_the_filesystem_allows_it(ring_file: Path, small_ring: None) -> None:
    """Forcing direct on a filesystem that takes O_DIRECT must really use it, or the other tests of the
    direct path test nothing."""
    if not _direct_works(ring_file):
        pytest.skip("O_DIRECT refused here")
    result = load(ring_file, read_path="direct")
    assert_same(result.tensors, reference_load(ring_file))
    assert set(result.stats.paths.values()) == {"direct"}


@pytest.mark.parametrize("read_path", PATHS)
def test_stats_name_a_concrete_path(misaligned_file: Path, read_path: str) -> None:
    result = load(misaligned_file, read_path=read_path)
    assert list(result.stats.paths.values())[0] in CONCRETE


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
@pytest.mark.parametrize("read_path", PATHS)
def test_tmpfs(ring_file: Path, small_ring: None, read_path: str) -> None:
    """tmpfs may refuse O_DIRECT (older kernels) or take it (6.6+): either way the values are right."""
    shm = Path("/dev/shm") / f"flashtensors-test-{uuid.uuid4().hex}.safetensors"
    shutil.copyfile(ring_file, shm)
    try:
        result = load(shm, read_path=read_path)
        assert_same(result.tensors, reference_load(ring_file))
        assert set(result.stats.paths.values()) <= CONCRETE
    finally:
        shm.unlink()


def test_unknown_read_path(misaligned_file: Path) -> None:
    with pytest.raises(ConfigError):
        load_state_dict(misaligned_file, read_path="mmap")
    with pytest.raises(ConfigError):
        ft.configure(read_path="fast")


@pytest.mark.parametrize("read_path", PATHS)
def test_chunks_read_in_pieces(ring_file: Path, read_path: str) -> None:
    """``read_size`` under the chunk: the files are read in 8 KiB requests (the last one short)."""
    ft.configure(chunk_size=64 * KiB, ring_size=256 * KiB, read_size=8 * KiB)
    assert_same(load_state_dict(ring_file, read_path=read_path), reference_load(ring_file))


def test_tiny_chunks_many_shards(index_dir: Path) -> None:
    """The smallest legal ring (two 4 KiB chunks) over several shards, with the direct path."""
    ft.configure(chunk_size=4 * KiB, ring_size=8 * KiB)
    assert_same(load_state_dict(index_dir, read_path="direct"), reference_load(index_dir))


@pytest.mark.parametrize("at_open", [True, False], ids=["open_refused", "reads_refused"])
def test_direct_falls_back_cleanly(
    ring_file: Path, small_ring: None, monkeypatch: pytest.MonkeyPatch, at_open: bool
) -> None:
    NoDirect(monkeypatch, at_open)
    result = load(ring_file, read_path="direct")
    assert_same(result.tensors, reference_load(ring_file))
    assert set(result.stats.paths.values()) == {"buffered"}


@pytest.mark.parametrize("pin_cache", [True, False], ids=["pin_cache", "no_pin_cache"])
def test_auto_choice_for_a_gpu(ring_file: Path, pin_cache: bool) -> None:
    """With "auto", a cached file goes to the GPU pinned in place, or through the ring with pin_cache=False;
    a file not in the page cache is read with O_DIRECT either way. (Only the choice: no GPU needed.)"""
    from flashtensors.config import get_settings
    from flashtensors.engine.api import _choose
    from flashtensors.engine.plan import make_plan

    region = make_plan([ring_file]).regions[0]
    gpu, settings = torch.device("cuda", 0), get_settings()
    ring_file.read_bytes()
    assert _choose(region, gpu, "auto", settings, pin_cache) == ("pinned-mmap" if pin_cache else "buffered")
    assert _choose(region, torch.device("cpu"), "auto", settings, pin_cache) == "buffered"
    assert _choose(region, gpu, "pinned-mmap", settings, pin_cache) == "pinned-mmap"  # forced stays forced
    if not drop_from_cache(ring_file):
        pytest.skip("this filesystem keeps the pages (cannot make a file cold here)")
    assert _choose(region, gpu, "auto", settings, pin_cache) == "direct"
    assert _choose(region, torch.device("cpu"), "auto", settings, pin_cache) == "direct"


@pytest.mark.parametrize("read_path", ["buffered", "direct"])
def test_stats_hold_the_reads_window(
    ring_file: Path, small_ring: None, monkeypatch: pytest.MonkeyPatch, read_path: str
) -> None:
    """``stats.reads`` spans every file read: it starts no later than the first, ends no earlier than the
    last, and lies within the load."""
    import time

    from flashtensors.engine import readers

    spans: list[tuple[float, float]] = []
    real = readers.pread_full

    def timed(fd: int, view: memoryview, offset: int) -> int:
        began = time.perf_counter()
        got = real(fd, view, offset)
        spans.append((began, time.perf_counter()))
        return got

    monkeypatch.setattr(readers, "pread_full", timed)
    result = load(ring_file, read_path=read_path)
    assert_same(result.tensors, reference_load(ring_file))
    assert len(spans) > 4  # the small ring reads this file in many chunks
    assert result.stats.reads is not None
    first, last = result.stats.reads
    assert 0 <= first <= last <= result.stats.seconds
    assert last - first >= max(e for _, e in spans) - min(b for b, _ in spans)
