"""The staging ring's readers on CPU: RingFeeder with the owner's CUDA steps (pin, DMA, event) replaced
by a host copy into a CPU arena, so the readers' side runs as it does on a GPU: whole chunks per reader,
or (``read_size``) one slot at a time shared by every reader, piece by piece in file order."""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from flashtensors.engine.devices import host_view
from flashtensors.engine.plan import make_plan
from flashtensors.engine.readers import Split
from flashtensors.engine.ring_feeder import RingFeeder
from flashtensors.engine.staging import Slot, StagingRing
from flashtensors.engine.sysio import pread_full

KiB = 1024


class HostFeeder(RingFeeder):
    """The owner copies each full slot into the CPU arena and frees it at once (no CUDA)."""

    def _copy(self, slot: Slot, i: int, offset: int, n: int) -> None:
        region = self.regions[i]
        dst = region.arena_offset + offset - region.file_start
        self.arena[dst : dst + n].copy_(host_view(self.ring.buffer.address + slot.offset, n))
        self.bytes[i] += n
        self._free.put(slot)

    def _recycle(self, block: bool) -> None:
        pass


class Requests:
    """A ReadWindow stand-in that notes every request: (fd, file offset, bytes)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int]] = []
        self.lock = threading.Lock()

    def read(self, fd: int, view: memoryview, offset: int) -> int:
        with self.lock:
            self.seen.append((fd, offset, len(view)))
        return pread_full(fd, view, offset)


def _load(files: list[Path], threads: int, read_size: int, direct: bool = False) -> tuple[Any, Requests]:
    plan = make_plan(files)
    arena = torch.zeros(plan.arena_size, dtype=torch.uint8)
    ring = StagingRing.allocate(4 * 64 * KiB, 64 * KiB)
    claims = Split([(r.file_start, r.file_end) for r in plan.regions])
    window = Requests()
    feeder = HostFeeder(ring, claims.front, list(plan.regions), arena, threads, direct, window, read_size)  # type: ignore[arg-type]
    feeder.finish()
    return (plan, arena, feeder), window


def _arena_matches_files(plan: Any, arena: torch.Tensor) -> None:
    for r in plan.regions:
        want = r.path.read_bytes()[r.file_start : r.file_end]
        got = bytes(arena[r.arena_offset : r.arena_offset + r.nbytes].numpy())
        assert got == want, r.path


@pytest.mark.parametrize("read_size", [0, 8 * KiB, 20 * KiB], ids=["whole", "8K", "20K"])
@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_the_readers_fill_the_arena(index_dir: Path, ring_file: Path, read_size: int, direct: bool) -> None:
    files = [ring_file, *sorted(index_dir.glob("*.safetensors"))]
    (plan, arena, feeder), window = _load(files, 3, read_size, direct)
    _arena_matches_files(plan, arena)
    assert feeder.bytes == [r.nbytes for r in plan.regions]
    largest = read_size or 64 * KiB
    assert all(n <= largest + 4 * KiB for _, _, n in window.seen)  # O_DIRECT rounds the last one up


def test_shared_slots_hand_out_pieces_in_file_order(ring_file: Path) -> None:
    """With read_size, each 64 KiB slot's 8 KiB pieces are handed out in file order across the readers:
    the requests, in the order they were made, never go back by more than the readers in flight."""
    threads = 4
    (plan, arena, _), window = _load([ring_file], threads, 8 * KiB)
    _arena_matches_files(plan, arena)
    offsets = [off for _, off, _ in window.seen]
    assert sorted(offsets) == list(range(plan.regions[0].file_start, plan.regions[0].file_end, 8 * KiB))
    # A request is noted when it starts; a piece handed out earlier may start a little later, but
    # never more than `threads` pieces behind one handed out after it.
    for k, off in enumerate(offsets):
        assert off >= max(offsets[: k + 1]) - threads * 8 * KiB


@pytest.mark.parametrize("read_size", [0, 8 * KiB], ids=["whole", "8K"])
def test_freed_slots_are_reused_first(ring_file: Path, read_size: int) -> None:
    """The slot freed last is handed out next, so a load keeps reading into a few slots instead of
    walking the whole ring (reads into less memory ran faster on the H100 machine's disk). One reader,
    each read waiting until the owner has freed every slot filled before it: ~46 slots' worth of file
    through a ring of 16 slots then stays in at most two of them (in ring order it would visit all)."""
    plan = make_plan([ring_file])
    region = plan.regions[0]
    arena = torch.zeros(plan.arena_size, dtype=torch.uint8)
    ring = StagingRing.allocate(16 * 64 * KiB, 64 * KiB)
    claims = Split([(r.file_start, r.file_end) for r in plan.regions])
    used: set[int] = set()
    freed = [0]
    done = threading.Condition()

    class Counting(HostFeeder):
        def _copy(self, slot: Slot, i: int, offset: int, n: int) -> None:
            with done:
                super()._copy(slot, i, offset, n)
                freed[0] += 1
                done.notify_all()

    class Slots(Requests):
        def read(self, fd: int, view: memoryview, offset: int) -> int:
            address = ctypes.addressof(ctypes.c_char.from_buffer(view))
            used.add((address - ring.buffer.address) // ring.slot_size)
            filled = (offset - region.file_start) // ring.slot_size  # slots filled before this read
            with done:
                assert done.wait_for(lambda: freed[0] >= filled, timeout=30)
            return super().read(fd, view, offset)

    feeder = Counting(ring, claims.front, list(plan.regions), arena, 1, False, Slots(), read_size)  # type: ignore[arg-type]
    feeder.finish()
    _arena_matches_files(plan, arena)
    assert region.nbytes > 2 * len(ring.slots) * ring.slot_size
    assert 1 <= len(used) <= 2


def test_whole_chunks_without_read_size(ring_file: Path) -> None:
    (plan, arena, _), window = _load([ring_file], 3, 0)
    _arena_matches_files(plan, arena)
    region = plan.regions[0]
    assert sorted(off for _, off, _ in window.seen) == list(
        range(region.file_start, region.file_end, 64 * KiB)
    )


def test_a_reader_error_reaches_the_owner(ring_file: Path) -> None:
    plan = make_plan([ring_file])
    arena = torch.zeros(plan.arena_size, dtype=torch.uint8)
    ring = StagingRing.allocate(4 * 64 * KiB, 64 * KiB)
    claims = Split([(r.file_start, r.file_end) for r in plan.regions])

    class Failing(Requests):
        def read(self, fd: int, view: memoryview, offset: int) -> int:
            if offset >= 3 * 64 * KiB:
                raise OSError(5, "Input/output error")
            return super().read(fd, view, offset)

    feeder = HostFeeder(ring, claims.front, list(plan.regions), arena, 3, False, Failing(), 8 * KiB)  # type: ignore[arg-type]
    with pytest.raises(OSError, match="Input/output error"):
        feeder.finish()
    assert not ring.lock.locked()  # the ring is let go for the next load
