"""The C cold loop (:mod:`flashtensors.engine.native`) on a CUDA device: cold O_DIRECT loads take it by
default and give safetensors' bytes; ``native_reads`` off takes the Python loop, with the same bytes; a
failed read fails the load, lets the ring go, and the next load works; the copies queue behind the work
already on the caller's stream; a later load reuses the first one's events."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import flashtensors as ft
from flashtensors.engine import devices, native, staging
from flashtensors.engine.api import load
from flashtensors.engine.plan import GPU_TENSOR_ALIGN, make_plan, resolve_files
from flashtensors.errors import FormatError
from helpers.compare import assert_same, reference_load

pytestmark = pytest.mark.gpu
DEV = "cuda:0"


@pytest.mark.parametrize("on", [True, False], ids=["c_loop", "python_loop"])
@pytest.mark.parametrize("ring", ["auto", "small"])
def test_cold_direct_loads_by_the_c_loop(
    qwen3_dir: Path, ring_file: Path, monkeypatch: pytest.MonkeyPatch, on: bool, ring: str
) -> None:
    if native.library() is None:
        pytest.skip(f"the C loop cannot be built here: {native.unavailable_reason()}")
    if ring == "small":
        ft.configure(chunk_size=64 * 1024, ring_size=256 * 1024)  # 4 slots: ring_file wraps it many times
    ft.configure(native_reads=on)
    monkeypatch.setattr(native, "last_stats", None)
    for checkpoint in (qwen3_dir, ring_file):
        result = load(checkpoint, device=DEV, read_path="direct")
        assert_same(result.tensors, reference_load(checkpoint), device=DEV)
        assert set(result.stats.paths.values()) == {"direct"}
        assert result.stats.reads is not None
        first, last = result.stats.reads
        assert 0 <= first <= last <= result.stats.seconds
    assert (native.last_stats is not None) == on
    if on:
        assert native.last_stats is not None and native.last_stats.reads == native.last_stats.copies > 4


def test_a_file_that_shrinks_fails_the_load_and_lets_the_ring_go(
    ring_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if native.library() is None:
        pytest.skip(f"the C loop cannot be built here: {native.unavailable_reason()}")
    ft.configure(chunk_size=64 * 1024, ring_size=256 * 1024)
    victim = tmp_path / "victim.safetensors"
    shutil.copy(ring_file, victim)
    real = native.read_regions

    def shrink_first(regions, fds, *args, **kwargs):  # type: ignore[no-untyped-def]
        os.truncate(victim, victim.stat().st_size // 2)  # after the plan, before the reads
        return real(regions, fds, *args, **kwargs)

    monkeypatch.setattr(native, "read_regions", shrink_first)
    with pytest.raises(FormatError, match="shrank"):
        load(victim, device=DEV, read_path="direct")
    monkeypatch.setattr(native, "read_regions", real)
    ring = staging.staging_ring(ft.get_settings(), 16, 0, staging.direct_slot_size(ft.get_settings()), True)
    assert not ring.lock.locked()
    shutil.copy(ring_file, victim)
    result = load(victim, device=DEV, read_path="direct")
    assert_same(result.tensors, reference_load(ring_file), device=DEV)


@pytest.mark.parametrize("on", [True, False], ids=["c_loop", "python_loop"])
def test_the_copies_follow_the_work_queued_on_the_callers_stream(qwen3_dir: Path, on: bool) -> None:
    """The arena reuses a block whose last writer is still queued on the caller's stream: the loaded bytes
    must land after that write, not under it."""
    if on and native.library() is None:
        pytest.skip(f"the C loop cannot be built here: {native.unavailable_reason()}")
    ft.configure(native_reads=on)
    size = make_plan(resolve_files(qwen3_dir), GPU_TENSOR_ALIGN).arena_size
    stream = torch.cuda.Stream(device=DEV)
    with torch.cuda.stream(stream):
        junk = torch.empty(size, dtype=torch.uint8, device=DEV)
        block = junk.data_ptr()
        torch.cuda._sleep(500_000_000)  # the GPU spins for a while, then the fill overwrites the block
        junk.fill_(0x5A)
        del junk
        result = load(qwen3_dir, device=DEV, read_path="direct")
    ptrs = [t.data_ptr() for t in result.tensors.values()]
    assert block <= min(ptrs) < block + size  # the arena is the block the fill is queued to write
    assert_same(result.tensors, reference_load(qwen3_dir), device=DEV)


def test_a_later_cold_load_reuses_the_events_of_the_first(
    qwen3_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first load's events (made by its head start) are given back and serve the next load, which
    makes none and still gives safetensors' bytes."""
    if native.library() is None:
        pytest.skip(f"the C loop cannot be built here: {native.unavailable_reason()}")
    ft.configure(native_reads=True)
    load(qwen3_dir, device=DEV, read_path="direct")
    rt = devices.runtime()
    real = rt.create_event
    made: list[int | None] = []
    monkeypatch.setattr(rt, "create_event", lambda: made.append(real()) or made[-1])
    monkeypatch.setattr(native, "last_stats", None)
    result = load(qwen3_dir, device=DEV, read_path="direct")
    assert_same(result.tensors, reference_load(qwen3_dir), device=DEV)
    assert native.last_stats is not None and native.last_stats.copies > 0
    assert made == []
