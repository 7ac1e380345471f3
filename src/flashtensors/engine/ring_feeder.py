"""Reading files to the GPU through the staging ring (:mod:`flashtensors.engine.staging`) in Python:
reader threads fill its slots and make no CUDA call; the thread that owns the feeder pins the slots and
queues their copies. The cold and buffered read paths (:func:`read_through_ring`, which hands cold
O_DIRECT loads to the C loop of :mod:`flashtensors.engine.native` where it can) and the warm path's
tail (:mod:`flashtensors.engine.pinned_mmap`, while that thread pins the head) use it."""

from __future__ import annotations

import collections
import errno
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from flashtensors.config import Settings
from flashtensors.engine import devices, native
from flashtensors.engine.plan import FileRegion
from flashtensors.engine.readers import ReadWindow, Split, shrank, start_gated
from flashtensors.engine.staging import Slot, StagingRing, direct_slot_size, staging_ring
from flashtensors.engine.streams import make_streams, own_side_stream, pooled_stream, prime_copies
from flashtensors.engine.sysio import DIRECT_ALIGN, align_up, buffer_at, open_direct, pread_full

# (region index, file offset, bytes) of the next chunk, or None when none is left; given the most bytes.
Claim = Callable[[int], tuple[int, int, int] | None]


@dataclass
class _Filling:
    """A slot that several readers fill, piece by piece (``read_size``), with one claimed chunk."""

    slot: Slot
    region: int
    offset: int  # the chunk's file offset
    n: int  # the chunk's bytes
    taken: int = 0  # bytes handed out as pieces
    done: int = 0  # bytes read


class RingFeeder:
    """Reader threads that read claimed chunks into the staging ring's slots and make no CUDA call; the
    thread that owns the feeder queues each full slot's copy in :meth:`pump`, between its own CUDA calls.

    For a warm load that pins the page cache on one thread (:mod:`flashtensors.engine.pinned_mmap`):
    the driver holds one lock while cudaHostRegister runs, so a copy or stream made by a reader thread
    would wait out every registration (measured in engine v2: the hybrid then lost to both its halves).
    Here, measured on the H100 machine (``benches/probes/hybrid2.py``), pinning the head while 8 threads
    read the tail took a 4B load from 30 to 45 GB/s and a 0.6B one from 33 to 37-40.

    With ``direct``, files are read with O_DIRECT (claims must then start on 4 KiB file offsets; the
    requests are rounded up to 4 KiB); a file whose filesystem refuses it, at open or at the first read,
    is read through the page cache instead, and :attr:`modes` says so. Reads are noted in ``window``.

    Holds the ring from construction to :meth:`finish` or :meth:`abort`; one of them must be called.
    """

    def __init__(
        self,
        ring: StagingRing,
        claim: Claim,
        regions: list[FileRegion],
        arena: torch.Tensor,
        threads: int,
        direct: bool = False,
        window: ReadWindow | None = None,
        read_size: int = 0,
    ) -> None:
        self.ring, self.claim, self.regions, self.arena = ring, claim, regions, arena
        self.read_size = read_size  # bytes per read request (0: a whole chunk at once)
        self._fill_lock = threading.Lock()
        self._fillings: list[_Filling] = []  # slots being filled with pieces left to hand out, oldest first
        self.bytes = [0] * len(regions)  # per region, what went through the ring
        self.modes = ["buffered"] * len(regions)  # per region, "direct" while its O_DIRECT reads work
        self._pread = pread_full if window is None else window.read
        self._fallback_lock = threading.Lock()
        self._spare_fds: list[int] = []  # O_DIRECT descriptors replaced by a fallback, closed at the end
        # Last freed, first reused: O_DIRECT reads into a few hot slots beat reads spread over the whole
        # ring (H100 machine, raw 16 x 512 KiB: 2.16-2.25 GB/s into 8 MiB in all, 1.78-1.84 into rings
        # of 32-512 MiB; docs/perf-notes.md, fourteenth session).
        self._free: queue.LifoQueue[Slot] = queue.LifoQueue()
        self._full: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._inflight: collections.deque[Slot] = collections.deque()
        self._stop = False
        self._fds: list[int] = []
        self._stream: torch.cuda.Stream | None = None
        ring.lock.acquire()
        self._owns_ring = True
        try:
            for slot in ring.slots:
                if slot.event is not None:
                    slot.event.synchronize()
                self._free.put(slot)
            for i, r in enumerate(regions):
                fd = open_direct(r.path) if direct else None
                if fd is not None:
                    self.modes[i] = "direct"
                self._fds.append(fd if fd is not None else os.open(r.path, os.O_RDONLY))
            count = max(1, min(threads, len(ring.slots) - 1))
            # All started before any reads: a thread started while others read waits for the GIL
            # (8 readers took 53-122 ms to start one by one on the CPU machine, 21-65 ms on the H100's).
            self._threads, go = start_gated(count, self._read, "flash-ring")
            self._running = len(self._threads)
            go.set()
        except BaseException:
            self._close()
            raise

    def _read(self) -> None:
        """A reader thread: whole chunks, or pieces of a shared slot with ``read_size``. An error is
        handed to the owner, who stops the others; the final None says this reader is done."""
        try:
            if self.read_size and self.read_size < self.ring.slot_size:
                self._read_shared()
            else:
                self._read_whole()
        except BaseException as exc:
            self._full.put(exc)
        finally:
            self._full.put(None)

    def _read_whole(self) -> None:
        """Each reader claims a chunk and reads it into a slot of its own, in one request."""
        while not self._stop:
            chunk = self.claim(self.ring.slot_size)
            if chunk is None:
                break
            i, offset, n = chunk
            slot = self._free.get()
            if self._stop:
                self._free.put(slot)
                break
            got = self._read_chunk(i, self.ring.buffer.address + slot.offset, offset, n)
            if got < n:
                raise shrank(self.regions[i].path)
            self._full.put((slot, i, offset, n))

    def _read_shared(self) -> None:
        """The readers fill one slot at a time together: each takes the next ``read_size`` piece of the
        oldest slot with pieces left, in file order, so the requests in flight cover adjacent bytes (as a
        raw read by that many threads of that request size does); whoever reads a slot's last byte hands
        it to the owner."""
        base = self.ring.buffer.address
        while not self._stop:
            got = self._next_piece()
            if got is None:
                break
            filling, start, m = got
            read = self._read_chunk(
                filling.region, base + filling.slot.offset + start, filling.offset + start, m
            )
            if read < m:
                raise shrank(self.regions[filling.region].path)
            with self._fill_lock:
                filling.done += m
                full = filling.done == filling.n
            if full:
                self._full.put((filling.slot, filling.region, filling.offset, filling.n))

    def _next_piece(self) -> tuple[_Filling, int, int] | None:
        """The next piece to read: (its slot's filling, offset in the slot, bytes); None when nothing is
        left or the feeder stops. Opens a slot for the next claimed chunk when every open one is taken."""
        with self._fill_lock:
            if self._fillings:
                return self._piece_of(self._fillings[0])
        slot = self._free.get()  # outside the lock: the owner frees slots while readers wait here
        with self._fill_lock:
            if self._stop:
                self._free.put(slot)
                return None
            if self._fillings:  # another reader opened one meanwhile: read that one first
                self._free.put(slot)
                return self._piece_of(self._fillings[0])
            chunk = self.claim(self.ring.slot_size)
            if chunk is None:
                self._free.put(slot)
                return None
            filling = _Filling(slot, *chunk)
            self._fillings.append(filling)
            return self._piece_of(filling)

    def _piece_of(self, filling: _Filling) -> tuple[_Filling, int, int]:
        """Hand out ``filling``'s next piece (the caller holds ``_fill_lock``); a filling whose pieces
        are all handed out leaves the open list."""
        start = filling.taken
        m = min(self.read_size, filling.n - start)
        filling.taken += m
        if filling.taken == filling.n:
            self._fillings.remove(filling)
        return filling, start, m

    def _read_chunk(self, i: int, address: int, offset: int, n: int) -> int:
        if self.modes[i] == "direct":
            fd = self._fds[i]
            try:
                return self._pread(fd, buffer_at(address, align_up(n, DIRECT_ALIGN)), offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._fall_back(i, fd)
        return self._pread(self._fds[i], buffer_at(address, n), offset)

    def _fall_back(self, i: int, refused: int) -> None:
        """Region ``i``'s filesystem took O_DIRECT at open but refuses the reads: read it through the
        page cache from now on (the refused descriptor stays open: other readers may still hold it)."""
        with self._fallback_lock:
            if self._fds[i] == refused:
                self._fds[i] = os.open(self.regions[i].path, os.O_RDONLY)
                self._spare_fds.append(refused)
                self.modes[i] = "buffered"

    @property
    def running(self) -> bool:
        return self._running > 0

    def pump(self, wait: bool = False) -> None:
        """Queue the copy of every slot read so far, and hand back the slots whose copies are done. With
        ``wait``, first block until a reader delivers a slot or the oldest copy completes.

        Raises:
            whatever a reader raised (the feeder must then be aborted).
        """
        if wait and self._full.empty():
            if self._inflight:
                self._recycle(block=True)
            elif self.running:
                self._take(self._full.get())
        while True:
            try:
                item = self._full.get_nowait()
            except queue.Empty:
                break
            self._take(item)
        self._recycle(block=False)

    def _take(self, item: Any) -> None:
        if item is None:
            self._running -= 1
            return
        if isinstance(item, BaseException):
            raise item
        slot, i, offset, n = item
        if self._stop:
            self._free.put(slot)
            return
        self._copy(slot, i, offset, n)

    def _copy(self, slot: Slot, i: int, offset: int, n: int) -> None:
        """Queue the DMA of a full slot (``n`` bytes of region ``i`` from file ``offset``): pin the slot
        on its first use, record an event behind the copy, and hold the slot until the event completes."""
        if not slot.pinned:
            self.ring.buffer.pin(slot.offset)
            slot.pinned = True
        if self._stream is None:
            self._stream = pooled_stream(self.arena.device, avoid=own_side_stream(self.arena.device))
            self._stream.wait_stream(torch.cuda.current_stream(self.arena.device))
        region = self.regions[i]
        dst = region.arena_offset + offset - region.file_start
        if dst < 0 or dst + n > self.arena.numel():  # the plan's bug, never a copy out of bounds
            raise RuntimeError(f"ring copy of {n} bytes to arena offset {dst} is out of bounds")
        src = self.ring.buffer.address + slot.offset
        with torch.cuda.stream(self._stream):
            if not devices.copy_to_device(self.arena.data_ptr() + dst, src, n, self._stream):
                if slot.tensor is None:
                    slot.tensor = devices.host_view(src, self.ring.slot_size)
                self.arena[dst : dst + n].copy_(slot.tensor[:n], non_blocking=True)
            slot.event = torch.cuda.Event()
            slot.event.record(self._stream)
        self._inflight.append(slot)
        self.bytes[i] += n

    def _recycle(self, block: bool) -> None:
        while self._inflight:
            slot = self._inflight[0]
            assert slot.event is not None
            if not block and not slot.event.query():
                break
            slot.event.synchronize()
            self._inflight.popleft()
            self._free.put(slot)
            block = False

    def finish(self) -> None:
        """Wait until every claimed chunk is on the device, then let the ring go."""
        try:
            while self.running:
                self.pump(wait=True)
            self.pump()
            while self._inflight:
                self._recycle(block=True)
        except BaseException:
            self.abort()
            raise
        self._close()

    def abort(self) -> None:
        """Stop the readers (each finishes the read it is in), wait for queued copies, let the ring go."""
        self._stop = True
        while self.running or self._inflight:
            if self._inflight:
                self._recycle(block=True)
                continue
            item = self._full.get()
            if item is None:
                self._running -= 1
            elif not isinstance(item, BaseException):
                self._free.put(item[0])
        self._close()

    def _close(self) -> None:
        for t in getattr(self, "_threads", []):
            t.join()
        for fd in self._fds + self._spare_fds:
            os.close(fd)
        self._fds, self._spare_fds = [], []
        if self._owns_ring:
            self._owns_ring = False
            self.ring.lock.release()


def read_through_ring(
    regions: list[FileRegion],
    arena: torch.Tensor,
    settings: Settings,
    direct: bool,
    window: ReadWindow | None = None,
    while_reading: Callable[[], None] | None = None,
) -> list[str]:
    """Fill GPU arena regions: ``io_threads`` threads (``cpu_threads`` for buffered reads) read chunks
    into the staging ring's slots, and this thread queues each full slot's copy. With ``read_size``
    auto, each O_DIRECT reader reads whole slots of 512 KiB in one request, from a ring of their own
    (:func:`~flashtensors.engine.staging.direct_slot_size`) of 1.5 slots per reader with ``ring_size``
    auto, so the reads land in few places. With ``read_size`` set, O_DIRECT readers fill ``chunk_size``
    slots together in ``read_size`` pieces, from a ring of two slots per reader (four for a load of
    4 GiB or more); buffered readers read a whole chunk each from the ``chunk_size`` ring
    (:func:`~flashtensors.engine.staging.ring_slots`).

    Readers make no CUDA call. Measured on the H100 machine (``benches/probes/coldwin.py``, 0.6B): when
    each reader pinned and copied its own slots, a reader spent 1.3-2.3 ms between two reads in a
    process's later loads; here 0.04 ms. A process's first load waits longer: the first use of torch's
    copy path (~95-125 ms of torch and driver code after a cache drop, ``benches/probes/primeph.py``)
    holds the GIL that the readers need between reads. So the copies call cudaMemcpyAsync directly
    (:func:`flashtensors.engine.devices.copy_to_device`): first loads waited 1.1-3.9 ms between reads
    on average (nine processes) against 4.9-6.8 with ``copy_`` (three, the same call).

    A slot is reused only after the event recorded behind its copy has completed, so a reused staging
    buffer can never leak into a tensor. ``while_reading`` runs on this thread while the first reads
    fly (the load builds its tensor views there). In a process's first load after a cache drop that
    took 100-240 ms, faulting torch's code in from the disk these reads keep busy, until the engine
    took the views' paths at import (``api.warm_views``): 2.3-4.7 ms since, and the readers' mean wait
    between reads fell from 1.3-2.2 ms to 0.04-0.05 ms (``coldwin.py``, H100 machine, 2026-11-28).

    With ``read_size`` auto and ``native_reads`` (the defaults), O_DIRECT loads are read by the C loop
    instead (:func:`flashtensors.engine.native.read_ring`): the same ring, the same claims from the
    front, but readers that copy their own slots, with no Python between two reads. Where it cannot
    take a load (no library, no direct runtime calls, a file that refuses O_DIRECT), this Python loop
    reads it.

    Returns:
        The path each region took: "direct", or "buffered" (asked for, or O_DIRECT refused).
    """
    device = arena.device
    threads = settings.io_threads if direct else settings.cpu_threads
    nbytes = sum(r.file_end - r.file_start for r in regions)
    if direct and native.takes_cold_loads(settings):
        ran = [False]

        def views() -> None:
            ran[0] = True
            if while_reading is not None:
                while_reading()

        with torch.cuda.device(device):
            if native.read_ring(regions, arena, settings, threads, nbytes, window, views):
                return ["direct"] * len(regions)
        if ran[0]:
            while_reading = None  # done already, before a read was refused
    if direct:
        ring = staging_ring(settings, threads, nbytes, direct_slot_size(settings), not settings.read_size)
    else:
        ring = staging_ring(settings)
    claims = Split([(r.file_start, r.file_end) for r in regions])  # all of it from the front, in order
    with torch.cuda.device(device):
        feeder = RingFeeder(ring, claims.front, regions, arena, threads, direct, window, settings.read_size)
        try:
            if devices.raw_copies():
                make_streams(device, 2)  # the feeder's stream, while the first reads are in flight
            else:
                prime_copies(device, 2)  # torch's copy path's first use, meanwhile
            if while_reading is not None:
                while_reading()
        except BaseException:
            feeder.abort()
            raise
        feeder.finish()
    return feeder.modes
