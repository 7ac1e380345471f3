"""The warm path's ring reader (:mod:`flashtensors.engine.pinned_mmap`): threads read a load's tail into
the staging ring (:mod:`flashtensors.engine.readers`) while another thread pins its head."""

from __future__ import annotations

import collections
import os
import queue
from collections.abc import Callable
from typing import Any

import torch

from flashtensors.engine.plan import FileRegion
from flashtensors.engine.readers import Slot, StagingRing, shrank, start_gated
from flashtensors.engine.streams import own_side_stream, pooled_stream
from flashtensors.engine.sysio import buffer_at, pread_full

# (region index, file offset, bytes) of the next chunk, or None when none is left; given the most bytes.
Claim = Callable[[int], tuple[int, int, int] | None]


class RingFeeder:
    """Reader threads that read claimed chunks into the staging ring's slots and make no CUDA call; the
    thread that owns the feeder queues each full slot's copy in :meth:`pump`, between its own CUDA calls.

    For a warm load that pins the page cache on one thread (:mod:`flashtensors.engine.pinned_mmap`):
    the driver holds one lock while cudaHostRegister runs, so a copy or stream made by a reader thread
    would wait out every registration (measured in engine v2: the hybrid then lost to both its halves).
    Here, measured on the H100 machine (``benches/probes/hybrid2.py``), pinning the head while 8 threads
    read the tail took a 4B load from 30 to 45 GB/s and a 0.6B one from 33 to 37-40.

    Holds the ring from construction to :meth:`finish` or :meth:`abort`; one of them must be called.
    """

    def __init__(
        self,
        ring: StagingRing,
        claim: Claim,
        regions: list[FileRegion],
        arena: torch.Tensor,
        threads: int,
    ) -> None:
        self.ring, self.claim, self.regions, self.arena = ring, claim, regions, arena
        self.bytes = [0] * len(regions)  # per region, what went through the ring
        self._free: queue.SimpleQueue[Slot] = queue.SimpleQueue()
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
            self._fds = [os.open(r.path, os.O_RDONLY) for r in regions]
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
        try:
            while not self._stop:
                chunk = self.claim(self.ring.slot_size)
                if chunk is None:
                    break
                i, offset, n = chunk
                slot = self._free.get()
                if self._stop:
                    self._free.put(slot)
                    break
                got = pread_full(self._fds[i], buffer_at(self.ring.buffer.address + slot.offset, n), offset)
                if got < n:
                    raise shrank(self.regions[i].path)
                self._full.put((slot, i, offset, n))
        except BaseException as exc:  # handed to the owner, who stops the others
            self._full.put(exc)
        finally:
            self._full.put(None)

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
        if slot.tensor is None:
            slot.tensor = self.ring.buffer.prepare(slot.offset)
        if self._stream is None:
            self._stream = pooled_stream(self.arena.device, avoid=own_side_stream(self.arena.device))
            self._stream.wait_stream(torch.cuda.current_stream(self.arena.device))
        region = self.regions[i]
        dst = region.arena_offset + offset - region.file_start
        with torch.cuda.stream(self._stream):
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
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if self._owns_ring:
            self._owns_ring = False
            self.ring.lock.release()
