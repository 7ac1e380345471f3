"""The read paths: each fills a file's region of the arena with the file's bytes.

* ``buffered``: positional reads through the page cache by many threads — straight into the arena on
  CPU, through the pinned staging ring for a GPU (:mod:`flashtensors.engine.ring_feeder`).
* ``direct``: O_DIRECT reads of aligned supersets (no page-cache copy; what a cold file wants) — straight
  into the arena on CPU, through the pinned staging ring for a GPU.
* ``pinned-mmap`` (GPU only, :mod:`flashtensors.engine.pinned_mmap`): map the file, pin the page cache
  in place piece by piece (cudaHostRegister, read-only) and DMA from it; pinning and copying overlap.
  What a warm file wants.
* ``pinned``: the file is already pinned in the RAM tier (:mod:`flashtensors.engine.pinned`): one DMA.

Each function takes the regions it should fill and returns nothing; errors propagate from worker threads.
"""

from __future__ import annotations

import bisect
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flashtensors.config import Settings
from flashtensors.engine import devices
from flashtensors.engine.plan import FileRegion
from flashtensors.engine.streams import side_stream
from flashtensors.engine.sysio import DIRECT_ALIGN, align_up, buffer_at, open_direct, pread_full
from flashtensors.errors import FormatError


@dataclass
class _Job:
    fd: int
    file_offset: int
    length: int  # bytes to request (aligned for O_DIRECT)
    useful: int  # bytes of the file within the request
    arena_offset: int


class ReadWindow:
    """When a load's file reads ran: the first one's start and the last one's end (``perf_counter``).

    A cold load's time is its reads plus what comes before the first and after the last (planning,
    allocation, the last copies, the tensor views); the window tells the two apart. The direct and
    buffered paths note every read; pinned and pinned-mmap (DMA from pinned memory) note none.
    """

    def __init__(self) -> None:
        self.first: float | None = None
        self.last: float | None = None
        self._lock = threading.Lock()

    def read(self, fd: int, view: memoryview, offset: int) -> int:
        """``pread_full``, noted in the window."""
        began = time.perf_counter()
        try:
            return pread_full(fd, view, offset)
        finally:
            self.note(began, time.perf_counter())

    def note(self, began: float, ended: float) -> None:
        """Reads ran from ``began`` to ``ended`` (``perf_counter`` seconds)."""
        with self._lock:
            self.first = began if self.first is None else min(self.first, began)
            self.last = ended if self.last is None else max(self.last, ended)


def _jobs(region: FileRegion, fd: int, chunk: int, aligned: bool) -> list[_Job]:
    jobs = []
    off = region.file_start
    while off < region.file_end:
        useful = min(chunk, region.file_end - off)
        length = align_up(useful, DIRECT_ALIGN) if aligned else useful
        jobs.append(_Job(fd, off, length, useful, region.arena_offset + off - region.file_start))
        off += useful
    return jobs


def start_gated(
    count: int, target: Callable[[], None], name: str
) -> tuple[list[threading.Thread], threading.Event]:
    """Start ``count`` threads that run ``target`` once the returned event is set; set it when ready.

    ``Thread.start`` returns only once the new thread has run, and a new thread must first take the GIL.
    Started while earlier readers already ran, each start waited for them: measured on the CPU machine,
    8 ring readers took 53-122 ms to start one after another (5-50 ms each), against 2-9 ms when none
    had work yet. Gated, every thread starts idle, and all begin together.

    If a thread cannot be started, the ones already started end without running ``target``, and the
    error propagates.
    """
    go = threading.Event()
    cancelled = False

    def gated() -> None:
        go.wait()
        if not cancelled:
            target()

    workers = [threading.Thread(target=gated, name=f"{name}-{i}", daemon=True) for i in range(count)]
    started: list[threading.Thread] = []
    try:
        for t in workers:
            t.start()
            started.append(t)
    except BaseException:
        cancelled = True
        go.set()
        for t in started:
            t.join()
        raise
    return workers, go


def _run_parallel(
    fn: Callable[[_Job], None],
    jobs: Iterable[_Job],
    threads: int,
    meanwhile: Callable[[], None] | None = None,
) -> None:
    """Run ``fn`` on every job with ``threads`` threads, all started before the first job begins;
    ``meanwhile`` runs on the calling thread while they work. A job's error stops the jobs not begun and
    propagates (the first one, before ``meanwhile``'s)."""
    todo: queue.SimpleQueue[_Job] = queue.SimpleQueue()
    count = 0
    for job in jobs:
        todo.put(job)
        count += 1
    errors: list[BaseException] = []

    def worker() -> None:
        while not errors:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            try:
                fn(job)
            except BaseException as exc:
                errors.append(exc)
                return

    workers, go = start_gated(max(1, min(threads, count)), worker, "flash-read")
    go.set()
    try:
        if meanwhile is not None:
            meanwhile()
    finally:
        for t in workers:
            t.join()
        if errors:
            raise errors[0]


class Split:
    """A load's bytes as one sequence (the regions in order), handed out in pieces from the front and
    from the back until the two meet. A warm load pins pieces from the front while the ring's readers
    take chunks from the back (:mod:`flashtensors.engine.pinned_mmap`); a cold one reads everything from
    the front (:func:`flashtensors.engine.ring_feeder.read_through_ring`). Every boundary between the
    two sides is a 4 KiB file offset (or a region's end), so every front piece starts on a page."""

    def __init__(self, spans: Sequence[tuple[int, int]]) -> None:
        self.spans = spans  # (file_start, file_end) per region; file_start on a page
        self.starts: list[int] = []
        total = 0
        for start, end in spans:
            self.starts.append(total)
            total += end - start
        self.lo, self.hi = 0, total
        self.front_bytes = [0] * len(spans)  # bytes taken from the front, per region
        self._lock = threading.Lock()

    @property
    def left(self) -> int:
        return self.hi - self.lo

    def _at(self, pos: int) -> int:
        return bisect.bisect_right(self.starts, pos) - 1  # empty regions share the next one's start

    def front(self, want: int) -> tuple[int, int, int] | None:
        """Up to ``want`` bytes from the front, within one region: (region index, file offset, bytes)."""
        with self._lock:
            if self.lo >= self.hi:
                return None
            i = self._at(self.lo)
            start, end = self.spans[i]
            n = min(want, self.starts[i] + end - start - self.lo, self.hi - self.lo)
            offset = start + self.lo - self.starts[i]
            self.lo += n
            self.front_bytes[i] += n
            return i, offset, n

    def back(self, want: int) -> tuple[int, int, int] | None:
        """Up to ``want`` bytes from the back, within one region, starting on a 4 KiB file offset unless
        it starts where the front stopped."""
        with self._lock:
            if self.hi <= self.lo:
                return None
            i = self._at(self.hi - 1)
            floor = max(self.starts[i], self.lo)
            # file_start is page-aligned, so a page-aligned offset into the region is a page in the file
            new = max(floor, self.starts[i] + align_up(max(0, self.hi - want - self.starts[i]), 4096))
            n, self.hi = self.hi - new, new
            return i, self.spans[i][0] + new - self.starts[i], n

    def close(self) -> None:
        """Nothing more may be taken (a failed load)."""
        with self._lock:
            self.hi = self.lo


def shrank(path: object) -> FormatError:
    return FormatError(
        f"{path}: the file shrank while it was read (is something rewriting it?)",
        hint="wait for the writer to finish, then load again; `flash verify MODEL` checks a stored model",
    )


class _DirectRefused(Exception):
    """The filesystem accepted O_DIRECT at open but refused the reads (EINVAL)."""


def read_into_host(
    regions: list[FileRegion],
    arena: torch.Tensor,
    settings: Settings,
    direct: bool,
    window: ReadWindow | None = None,
) -> list[str]:
    """Fill CPU arena regions with positional reads by ``cpu_threads`` (or ``io_threads``) threads.

    Returns the path actually used for each region ("direct", or "buffered" where O_DIRECT is refused).
    Every read is noted in ``window``.
    """
    read = window.read if window is not None else pread_full
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
                    got = read(job.fd, view, job.file_offset)
                except OSError as exc:
                    if mode == "direct" and exc.errno == 22:
                        raise _DirectRefused() from exc
                    raise
                if got < job.useful:
                    raise shrank(region.path)

            threads = settings.io_threads if mode == "direct" else settings.cpu_threads
            # Requests of read_size (or chunk_size) from one queue: in flight, they cover adjacent bytes.
            size = settings.read_size or settings.chunk_size
            try:
                _run_parallel(work, _jobs(region, fd, size, mode == "direct"), threads)
            except _DirectRefused:
                os.close(fd)
                fd = os.open(region.path, os.O_RDONLY)
                mode = "buffered"
                _run_parallel(work, _jobs(region, fd, size, False), settings.cpu_threads)
        finally:
            os.close(fd)
        used.append(mode)
    return used


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
