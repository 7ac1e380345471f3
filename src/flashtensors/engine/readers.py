"""The read paths: each fills a file's region of the arena with the file's bytes.

* ``buffered``: positional reads through the page cache by many threads — straight into the arena on
  CPU, through the pinned staging ring for a GPU.
* ``direct``: O_DIRECT reads of aligned supersets (no page-cache copy; what a cold file wants) — straight
  into the arena on CPU, through the pinned staging ring for a GPU.
* ``pinned-mmap`` (GPU only, :mod:`flashtensors.engine.pinned_mmap`): map the file, pin the page cache
  in place piece by piece (cudaHostRegister, read-only) and DMA from it; pinning and copying overlap.
  What a warm file wants.
* ``pinned``: the file is already pinned in the RAM tier (:mod:`flashtensors.engine.pinned`): one DMA.

Each function takes the regions it should fill and returns nothing; errors propagate from worker threads.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from flashtensors.config import Settings
from flashtensors.engine import devices
from flashtensors.engine.plan import FileRegion
from flashtensors.engine.sysio import DIRECT_ALIGN, align_up, buffer_at, open_direct, pread_full
from flashtensors.errors import FormatError


@dataclass
class _Job:
    fd: int
    file_offset: int
    length: int  # bytes to request (aligned for O_DIRECT)
    useful: int  # bytes of the file within the request
    arena_offset: int


def _jobs(region: FileRegion, fd: int, chunk: int, aligned: bool) -> list[_Job]:
    jobs = []
    off = region.file_start
    while off < region.file_end:
        useful = min(chunk, region.file_end - off)
        length = align_up(useful, DIRECT_ALIGN) if aligned else useful
        jobs.append(_Job(fd, off, length, useful, region.arena_offset + off - region.file_start))
        off += useful
    return jobs


def _run_parallel(
    fn: Callable[[_Job], None],
    jobs: Iterable[_Job],
    threads: int,
    meanwhile: Callable[[], None] | None = None,
) -> None:
    """Run ``fn`` on every job with ``threads`` threads; ``meanwhile`` runs on the calling thread once
    the jobs are submitted. Errors propagate (a job's first, then ``meanwhile``'s)."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="flash-read") as pool:
        futures = [pool.submit(fn, j) for j in jobs]
        try:
            if meanwhile is not None:
                meanwhile()
        finally:
            for future in futures:
                future.result()


def _shrank(path: object) -> FormatError:
    return FormatError(
        f"{path}: the file shrank while it was read (is something rewriting it?)",
        hint="wait for the writer to finish, then load again; `flash verify MODEL` checks a stored model",
    )


class _DirectRefused(Exception):
    """The filesystem accepted O_DIRECT at open but refused the reads (EINVAL)."""


def read_into_host(
    regions: list[FileRegion], arena: torch.Tensor, settings: Settings, direct: bool
) -> list[str]:
    """Fill CPU arena regions with positional reads by ``cpu_threads`` (or ``io_threads``) threads.

    Returns the path actually used for each region ("direct", or "buffered" where O_DIRECT is refused).
    """
    base = arena.data_ptr()
    used: list[str] = []
    for region in regions:
        fd = open_direct(region.path) if direct else None
        mode = "direct" if fd is not None else "buffered"
        if fd is None:
            fd = os.open(region.path, os.O_RDONLY)
        try:

            def work(job: _Job, mode: str = mode, region: FileRegion = region) -> None:
                view = buffer_at(base + job.arena_offset, job.length)
                try:
                    got = pread_full(job.fd, view, job.file_offset)
                except OSError as exc:
                    if mode == "direct" and exc.errno == 22:
                        raise _DirectRefused() from exc
                    raise
                if got < job.useful:
                    raise _shrank(region.path)

            threads = settings.io_threads if mode == "direct" else settings.cpu_threads
            try:
                _run_parallel(work, _jobs(region, fd, settings.chunk_size, mode == "direct"), threads)
            except _DirectRefused:
                os.close(fd)
                fd = os.open(region.path, os.O_RDONLY)
                mode = "buffered"
                _run_parallel(work, _jobs(region, fd, settings.chunk_size, False), settings.cpu_threads)
        finally:
            os.close(fd)
        used.append(mode)
    return used


_streams = threading.local()
_STREAMS_PER_DEVICE = 16
_pool: dict[torch.device, list[torch.cuda.Stream]] = {}
_pool_turn: dict[torch.device, int] = {}
_pool_lock = threading.Lock()


def _pooled_stream(device: torch.device) -> torch.cuda.Stream:
    """One of at most ``_STREAMS_PER_DEVICE`` streams of ours per device, handed out in turn; a new one
    is made when every stream made so far was handed out once (reader threads come and go with each
    load; the streams stay)."""
    with _pool_lock:
        streams = _pool.setdefault(device, [])
        turn = _pool_turn.get(device, 0)
        _pool_turn[device] = turn + 1
        if turn >= len(streams) and len(streams) < _STREAMS_PER_DEVICE:
            streams.append(devices.new_stream(device))
        return streams[turn % len(streams)]


def make_streams(device: torch.device, count: int) -> None:
    """Make streams for the pool now, up to ``count`` (at most ``_STREAMS_PER_DEVICE``), so the reader
    threads' first copies find them."""
    with _pool_lock:
        streams = _pool.setdefault(device, [])
        while len(streams) < min(count, _STREAMS_PER_DEVICE):
            streams.append(devices.new_stream(device))


_primed: set[torch.device] = set()


def prime_copies(device: torch.device, streams: int) -> None:
    """Once per process and device, run on this thread what a reader's first copy runs (a stream, a
    tensor over registered memory, an asynchronous copy from it, an event), then make the streams.

    Called by the loading thread while the readers' first reads are in flight. In a fresh process after
    a cache drop, the copies of a cold 0.6B load's first chunks started ~55 ms after their reads ended,
    on the H100 machine (``benches/probes/warmph.py ... cold``): the first reader to copy held the GIL
    while that code ran for the first time, and the others waited for it with the disk idle.
    """
    if device in _primed:
        return
    page = devices.PinnedBuffer(DIRECT_ALIGN, piece=DIRECT_ALIGN)  # one page, made as a ring slot is
    dst = torch.empty(64, dtype=torch.uint8, device=device)
    stream = side_stream(device, torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        dst.copy_(page.prepare(0)[:64], non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    done.synchronize()
    del page  # unpinned and unmapped, its copy done
    make_streams(device, streams)
    _primed.add(device)


def side_stream(device: torch.device, caller: torch.cuda.Stream) -> torch.cuda.Stream:
    """A stream for our copies that first waits for the caller's stream: the arena may be memory the
    caching allocator just recycled from a tensor that kernels queued there still read.

    One per thread and device, kept; made by :func:`devices.new_stream`, not taken from torch's pool,
    whose first use costs 2.7-5 ms (measured on the H100 machine). Two threads may share one stream:
    their copies then queue one after the other, and every wait is still on an event recorded behind
    the copy it guards.
    """
    cache = getattr(_streams, "by_device", None)
    if cache is None:
        cache = _streams.by_device = {}
    stream = cache.get(device)
    if stream is None:
        stream = cache[device] = _pooled_stream(device)
    stream.wait_stream(caller)
    return stream


@dataclass
class _Slot:
    offset: int  # in the ring's buffer
    tensor: torch.Tensor | None = None  # made, with the slot's pinning, before its first copy
    event: torch.cuda.Event | None = None


@dataclass
class StagingRing:
    """Pinned host slots, allocated once per process and reused: pinning fresh memory is slow (1.4 GB/s).

    Reads go into a slot by address. A slot is pinned (and gets its tensor) only before its first copy,
    by the reader thread that holds it (``buffer.prepare``): the first reads start without waiting for
    the ring, and the first use of the torch code behind the tensors overlaps other threads' reads.
    """

    slot_size: int
    buffer: devices.PinnedBuffer
    slots: list[_Slot] = field(default_factory=list)
    # One load at a time owns the slots; concurrent loads through the ring take turns (they would share
    # the disk and the copy engine anyway).
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def allocate(cls, ring_size: int, slot_size: int) -> StagingRing:
        count = max(2, ring_size // slot_size)
        buf = devices.PinnedBuffer(count * slot_size, piece=slot_size)
        slots = [_Slot(i * slot_size) for i in range(count)]
        return cls(slot_size, buf, slots)


_rings: dict[tuple[int, int], StagingRing] = {}
_ring_lock = threading.Lock()


def ring_is_ready(settings: Settings) -> bool:
    """Whether this process's staging ring for ``settings`` exists with every slot already pinned."""
    with _ring_lock:
        ring = _rings.get((settings.ring_size, settings.chunk_size))
    return ring is not None and all(slot.tensor is not None for slot in ring.slots)


def staging_ring(settings: Settings) -> StagingRing:
    key = (settings.ring_size, settings.chunk_size)
    with _ring_lock:
        ring = _rings.get(key)
        if ring is None:
            _rings.clear()  # settings changed: let the old ring go
            ring = _rings[key] = StagingRing.allocate(*key)
        return ring


def read_through_ring(
    regions: list[FileRegion], arena: torch.Tensor, settings: Settings, direct: bool
) -> list[str]:
    """Fill GPU arena regions: threads read chunks into pinned slots, each slot is DMAed as soon as full.

    A slot is reused only after the event recorded behind its copy has completed, so a reused staging
    buffer can never leak into a tensor. Reads of chunk k+1 overlap the copy of chunk k.
    """
    ring = staging_ring(settings)
    with ring.lock:
        return _ring_read(ring, regions, arena, settings, direct)


def _ring_read(
    ring: StagingRing, regions: list[FileRegion], arena: torch.Tensor, settings: Settings, direct: bool
) -> list[str]:
    free: queue.Queue[_Slot] = queue.Queue()
    for slot in ring.slots:
        free.put(slot)
    device = arena.device
    modes: list[str] = []
    fds: list[int] = []
    jobs: list[_Job] = []
    try:
        for region in regions:
            fd = open_direct(region.path) if direct else None
            modes.append("direct" if fd is not None else "buffered")
            fds.append(fd if fd is not None else os.open(region.path, os.O_RDONLY))
            jobs += _jobs(region, fds[-1], ring.slot_size, modes[-1] == "direct")
        # Direct reads of a region whose O_DIRECT reads fail midway fall back per job (buffered pread).
        fallback: dict[int, int | None] = {fd: None for fd in fds}
        paths = {fd: r.path for fd, r in zip(fds, regions, strict=True)}
        fallback_lock = threading.Lock()  # two threads may hit the same refusing file at once
        local = threading.local()

        def work(job: _Job) -> None:
            slot = free.get()
            try:
                if slot.event is not None:
                    slot.event.synchronize()
                view = buffer_at(ring.buffer.address + slot.offset, job.length)
                try:
                    got = pread_full(job.fd, view, job.file_offset)
                except OSError as exc:
                    if exc.errno != 22:
                        raise
                    with fallback_lock:
                        extra = fallback[job.fd]
                        if extra is None:
                            extra = fallback[job.fd] = os.open(paths[job.fd], os.O_RDONLY)
                    got = pread_full(extra, view[: job.useful], job.file_offset)
                if got < job.useful:
                    raise _shrank(paths[job.fd])
                # Pinning, the tensor and the stream are needed only now, so a new thread's first read
                # does not wait for them (in a fresh process after a cache drop, making the first
                # streams took 15-18 ms, the ring's tensors 39-57 ms).
                if slot.tensor is None:
                    slot.tensor = ring.buffer.prepare(slot.offset)
                if not hasattr(local, "stream"):
                    local.stream = side_stream(device, caller)
                with torch.cuda.stream(local.stream):
                    dst = arena[job.arena_offset : job.arena_offset + job.useful]
                    dst.copy_(slot.tensor[: job.useful], non_blocking=True)
                    slot.event = torch.cuda.Event()
                    slot.event.record(local.stream)
            finally:
                free.put(slot)

        threads = settings.io_threads if direct else settings.cpu_threads
        caller = torch.cuda.current_stream(device)
        threads = max(1, min(threads, len(ring.slots) - 1))
        with torch.cuda.device(device):
            _run_parallel(work, jobs, threads, meanwhile=lambda: prime_copies(device, threads))
            for slot in ring.slots:
                if slot.event is not None:
                    slot.event.synchronize()
        for fd, extra in fallback.items():
            if extra is not None:
                os.close(extra)
                modes[fds.index(fd)] = "buffered"
    finally:
        for fd in fds:
            os.close(fd)
    return modes


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
        self._free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        self._full: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._inflight: collections.deque[_Slot] = collections.deque()
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
            self._threads = [
                threading.Thread(target=self._read, name=f"flash-ring-{i}", daemon=True) for i in range(count)
            ]
            self._running = len(self._threads)
            for t in self._threads:
                t.start()
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
                    raise _shrank(self.regions[i].path)
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
            self._stream = _pooled_stream(self.arena.device)
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


def read_pinned(
    regions: list[FileRegion],
    arena: torch.Tensor,
    entries: Sequence[Any],
    while_copying: Callable[[], None] | None = None,
) -> None:
    """DMA files already pinned in the RAM tier, on one stream, then one sync.

    A copy may not span two registrations (the driver answers "invalid argument"), so copies are cut at
    the boundaries of the chunks each file was registered in. ``while_copying`` runs once every copy is
    queued, before the sync (the load builds its tensor views there).
    """
    stream = side_stream(arena.device, torch.cuda.current_stream(arena.device))
    with torch.cuda.stream(stream):
        for region, entry in zip(regions, entries, strict=True):
            base = entry.mapping.address
            chunk = entry.chunk_size
            off = region.file_start
            while off < region.file_end:
                n = min(chunk - off % chunk, region.file_end - off)
                dst = region.arena_offset + off - region.file_start
                arena[dst : dst + n].copy_(devices.host_view(base + off, n), non_blocking=True)
                off += n
    try:
        if while_copying is not None:
            while_copying()
    finally:
        stream.synchronize()
