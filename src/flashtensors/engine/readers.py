"""The read paths: each fills a file's region of the arena with the file's bytes.

* ``buffered``: positional reads through the page cache by many threads — straight into the arena on
  CPU, through the pinned staging ring for a GPU.
* ``direct``: O_DIRECT reads of aligned supersets (no page-cache copy; what a cold file wants) — straight
  into the arena on CPU, through the pinned staging ring for a GPU.
* ``pinned-mmap`` (GPU only): map the file, pin the page cache in place chunk by chunk
  (cudaHostRegister, read-only) and DMA from it; pinning and copying overlap. What a warm file wants.
* ``pinned``: the file is already pinned in the RAM tier (:mod:`flashtensors.engine.pinned`): one DMA.

Each function takes the regions it should fill and returns nothing; errors propagate from worker threads.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from flashtensors.config import Settings
from flashtensors.engine import devices
from flashtensors.engine.plan import FileRegion
from flashtensors.engine.sysio import DIRECT_ALIGN, Mapping, align_up, buffer_at, open_direct, pread_full
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


def _run_parallel(fn: Callable[[_Job], None], jobs: Iterable[_Job], threads: int) -> None:
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="flash-read") as pool:
        for future in [pool.submit(fn, j) for j in jobs]:
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
    """One of at most ``_STREAMS_PER_DEVICE`` streams of ours per device, made on first need and then
    handed out in turn (reader threads come and go with each load; the streams stay)."""
    with _pool_lock:
        streams = _pool.setdefault(device, [])
        if len(streams) < _STREAMS_PER_DEVICE:
            streams.append(devices.new_stream(device))
            return streams[-1]
        turn = _pool_turn.get(device, 0)
        _pool_turn[device] = turn + 1
        return streams[turn % len(streams)]


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
    tensor: torch.Tensor
    offset: int  # in the ring's buffer
    event: torch.cuda.Event | None = None


@dataclass
class StagingRing:
    """Pinned host slots, allocated once per process and reused: pinning fresh memory is slow (1.4 GB/s).

    Each slot is faulted in and pinned by the first reader thread that takes it (``buffer.prepare``),
    so the first reads start without waiting for the whole ring.
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
        slots = [_Slot(buf.tensor[i * slot_size : (i + 1) * slot_size], i * slot_size) for i in range(count)]
        return cls(slot_size, buf, slots)


_rings: dict[tuple[int, int], StagingRing] = {}
_ring_lock = threading.Lock()


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
                ring.buffer.prepare(slot.offset)
                if slot.event is not None:
                    slot.event.synchronize()
                view = buffer_at(slot.tensor.data_ptr(), job.length)
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
                # The stream is needed only now, so a new thread's first read does not wait for it
                # (in a fresh process after a cache drop, making the first streams took 15-18 ms).
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
        with torch.cuda.device(device):
            _run_parallel(work, jobs, max(1, min(threads, len(ring.slots) - 1)))
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


_releases: list[threading.Thread] = []
_releases_lock = threading.Lock()


def _release_later(pinned: list[int], maps: list[Mapping]) -> None:
    """Unpin and unmap in the background: the data is already on the GPU, and unregistering 16 GB
    takes ~0.16 s on the H100 machine, a quarter of a warm load."""

    def release() -> None:
        for address in pinned:
            devices.host_unregister(address)
        for m in maps:
            m.close()

    t = threading.Thread(target=release, name="flash-unpin", daemon=True)
    t.start()  # before it is listed: a concurrent wait_for_releases() may join it at once
    with _releases_lock:
        _releases.append(t)


def wait_for_releases() -> None:
    """Join background unpins, so pinned memory from earlier loads never piles up."""
    with _releases_lock:
        pending = list(_releases)
        _releases.clear()
    for t in pending:
        t.join()


# Pinning rate below which the rest of a warm load goes through the staging ring instead. Measured on
# the H100 machine (8 GB warm, fresh process): page cache filled by many threads reading scattered
# 16 MiB pieces sits in small folios and pins at 14-18 GB/s, where the ring's memcpy path (26-30 GB/s)
# is faster. Filled by sequential reads (cat, a download) it sits in 2 MiB folios and pins at 25-34 GB/s
# the first time and 43-57 GB/s in every later load, in any process; the ring never gets that speed-up
# (it pins nothing), so a first pin at 25 GB/s must not be sent to the ring (the threshold was 24).
SLOW_PIN_GBPS = 20.0
_PROBE_BYTES = 512 * 1024 * 1024  # pinned and timed before deciding; at least one full chunk


_FIRST_PIECE = 64 * 1024 * 1024
_PIECE_ALIGN = 2 * 1024 * 1024  # whole huge pages: a sequentially read page cache sits in 2 MiB folios


def pin_schedule(lengths: Sequence[int], cap: int) -> list[list[int]]:
    """How many bytes of each region to pin per cudaHostRegister call, in order.

    A copy can start only once its piece is pinned, and the copy of the last piece is left over after
    all pinning is done. So the first piece is small (64 MiB: DMA starts early), each later piece takes
    a quarter of what is left of the whole load (at least 64 MiB, at most ``cap``), and the pieces
    shrink towards the end: the DMA left after the last pin is that of ~64 MiB, not of ``cap`` (19 ms
    at 55 GB/s for 1 GiB, a third of a warm 0.6B load). Measured on the H100 machine, 16 pins of 1 GiB
    took as long as 4 of 4 GiB, so more calls cost little. Pieces start on 4 KiB boundaries (a region's
    last piece may end anywhere).
    """
    left_total = sum(lengths)
    out: list[list[int]] = []
    first = True
    for length in lengths:
        pieces: list[int] = []
        left = length
        while left > 0:
            want = _FIRST_PIECE if first else max(_FIRST_PIECE, left_total // 4)
            n = min(align_up(want, _PIECE_ALIGN), cap, left)
            pieces.append(n)
            left -= n
            left_total -= n
            first = False
        out.append(pieces)
    return out


def read_pinned_mmap(
    regions: list[FileRegion],
    arena: torch.Tensor,
    settings: Settings,
    while_copying: Callable[[], None] | None = None,
) -> list[str]:
    """Pin each file's page cache in place, chunk by chunk, and DMA each chunk as soon as it is pinned.

    One thread registers pieces in order (:func:`pin_schedule`) while the copy engine drains the pieces
    before it: measured on the H100 machine, registration runs at 35-57 GB/s and does not scale with more
    threads, and a copy may not span two registrations.

    Pinning is timed over the first ``_PROBE_BYTES``: where it runs slower than ``SLOW_PIN_GBPS`` (page
    cache in small folios), the bytes not yet pinned go through the staging ring instead.

    ``while_copying`` runs on a helper thread once the first copy is queued (the load builds its tensor
    views there): registration is the bottleneck and releases the GIL, so the views cost it nothing.

    Returns:
        The path each region ended on: "pinned-mmap", or "pinned-mmap+buffered" where it switched.
    """
    wait_for_releases()
    helper = _Helper(while_copying)
    device = arena.device
    maps: list[Mapping] = []
    pinned: list[int] = []
    rest: list[FileRegion] = []
    modes = ["pinned-mmap"] * len(regions)
    stream = side_stream(device, torch.cuda.current_stream(device))
    timed_bytes, timed_seconds = 0, 0.0
    try:
        with torch.cuda.stream(stream):
            schedule = pin_schedule([r.file_end - r.file_start for r in regions], settings.register_chunk)
            for i, (region, pieces) in enumerate(zip(regions, schedule, strict=True)):
                m = Mapping(region.path, region.file_end)
                maps.append(m)
                off = region.file_start
                for n in pieces:
                    if timed_bytes >= _PROBE_BYTES and timed_bytes / timed_seconds / 1e9 < SLOW_PIN_GBPS:
                        rest.append(_tail(region, off))
                        rest.extend(regions[i + 1 :])
                        modes[i:] = ["pinned-mmap+buffered"] * (len(regions) - i)
                        break
                    t0 = time.perf_counter()
                    # Register whole pages: the mapping covers them, the copy takes only file bytes.
                    devices.host_register(m.address + off, align_up(n, 4096))
                    if timed_bytes < _PROBE_BYTES:
                        timed_bytes += n
                        timed_seconds += time.perf_counter() - t0
                    pinned.append(m.address + off)
                    dst = region.arena_offset + off - region.file_start
                    arena[dst : dst + n].copy_(devices.host_view(m.address + off, n), non_blocking=True)
                    helper.start()
                    off += n
                if rest:
                    break
        helper.start()  # nothing was pinned (every region empty, or the probe switched at once)
        if rest:  # the ring's copies run on their own streams while the pinned ones drain
            read_through_ring(rest, arena, settings, direct=False)
        helper.join()
        stream.synchronize()
    except BaseException:
        helper.join(reraise=False)
        stream.synchronize()
        for address in pinned:
            devices.host_unregister(address)
        for m in maps:
            m.close()
        raise
    _release_later(pinned, maps)
    return modes


class _Helper:
    """Runs one callable on its own thread, started at most once; ``join`` re-raises what it raised."""

    def __init__(self, fn: Callable[[], None] | None) -> None:
        self.fn = fn
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _run(self) -> None:
        assert self.fn is not None
        try:
            self.fn()
        except BaseException as exc:  # handed to join(), on the loading thread
            self.error = exc

    def start(self) -> None:
        if self.fn is not None and self.thread is None:
            self.thread = threading.Thread(target=self._run, name="flash-views", daemon=True)
            self.thread.start()

    def join(self, reraise: bool = True) -> None:
        if self.thread is not None:
            self.thread.join()
        if reraise and self.error is not None:
            raise self.error


def _tail(region: FileRegion, start: int) -> FileRegion:
    """The part of ``region`` from file offset ``start`` on."""
    return replace(region, file_start=start, arena_offset=region.arena_offset + start - region.file_start)


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
