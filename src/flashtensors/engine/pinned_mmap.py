"""The ``pinned-mmap`` read path (GPU only): pin a file's page cache in place and DMA from it.

The files are mapped read-only and registered with cudaHostRegister in pieces from the front; each piece
is copied to the GPU as soon as it is pinned, while the next one is pinned. At the same time reader
threads copy the files from the back into the staging ring (:mod:`flashtensors.engine.ring_feeder`),
whose copies the pinning thread queues between its registrations; the two meet in the middle. Where the
page cache pins too slowly, pinning stops and the ring reads the rest. Pinned pieces are unpinned in the
background once their data is on the GPU. What a warm file wants.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import torch

from flashtensors.config import Settings
from flashtensors.engine import devices
from flashtensors.engine.plan import FileRegion
from flashtensors.engine.readers import Split
from flashtensors.engine.ring_feeder import RingFeeder
from flashtensors.engine.staging import ring_is_ready, staging_ring
from flashtensors.engine.streams import side_stream
from flashtensors.engine.sysio import Mapping, align_up

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
# With the ring reading the tail at once, pieces of at most 256 MiB were faster than 1 GiB ones (4B: 45
# against 38 GB/s; the ring's slots go back only between registrations), benches/probes/hybrid2.py.
_RING_PIECE_CAP = 256 * 1024 * 1024
# The ring reads a warm load's tail only where that pays for the ring's first use in a process (its
# slots faulted in and pinned, its stream made): in a fresh process on the H100 machine a 0.6B load
# (1.2 GB) took 0.061 s with the ring and 0.045 s without; a 4B one (8 GB) 0.225 s with it and 0.302 s
# without. Once the ring's slots are pinned (a daemon, any earlier load through the ring), it is used
# at any size: with the ring ready, 0.6B ran at 37-40 GB/s against 32-34 pinning alone (hybrid2.py).
RING_MIN_BYTES = 4 * 1024**3


def _piece(first: bool, left: int, cap: int) -> int:
    """How many bytes the next cudaHostRegister call should pin, with ``left`` bytes of the load not
    yet taken by anyone.

    A copy can start only once its piece is pinned, and the copy of the last piece is left over after
    all pinning is done. So the first piece is small (64 MiB: DMA starts early), each later piece takes
    a quarter of what is left (at least 64 MiB, at most ``cap``), and the pieces shrink towards the end:
    the DMA left after the last pin is that of ~64 MiB, not of ``cap`` (19 ms at 55 GB/s for 1 GiB, a
    third of a warm 0.6B load). Measured on the H100 machine, 16 pins of 1 GiB took as long as 4 of
    4 GiB, so more calls cost little.
    """
    want = _FIRST_PIECE if first else max(_FIRST_PIECE, left // 4)
    return min(align_up(want, _PIECE_ALIGN), cap)


def pin_schedule(lengths: Sequence[int], cap: int) -> list[list[int]]:
    """The pieces (bytes per cudaHostRegister call, per region) of a load that pins everything: what
    :func:`read_pinned_mmap` does without the ring."""
    split = Split([(0, length) for length in lengths])
    out: list[list[int]] = [[] for _ in lengths]
    first = True
    while (piece := split.front(_piece(first, split.left, cap))) is not None:
        out[piece[0]].append(piece[2])
        first = False
    return out


def read_pinned_mmap(
    regions: list[FileRegion],
    arena: torch.Tensor,
    settings: Settings,
    while_copying: Callable[[], None] | None = None,
) -> list[str]:
    """Pin the files' page cache in place from the front and DMA each piece as soon as it is pinned,
    while ``settings.warm_ring_threads`` threads read the files from the back into the staging ring.

    The ring takes part where the load has at least ``RING_MIN_BYTES`` or the ring is ready. One
    thread (this one) registers pieces (:func:`_piece`) and makes every CUDA call, the ring's copies
    included, between its registrations: measured on the H100 machine, registration runs at
    26-57 GB/s, does not scale with more threads, and holds the driver's lock; a copy may not span two
    registrations. The two sides meet where their speeds put them.

    Pinning is timed over the first ``_PROBE_BYTES``: where it runs slower than ``SLOW_PIN_GBPS`` (page
    cache in small folios), pinning stops and the ring reads the rest (with ``cpu_threads`` threads if
    ``warm_ring_threads`` is 0).

    ``while_copying`` runs on a helper thread once the first copy is queued (the load builds its tensor
    views there): registration releases the GIL, so the views cost it nothing.

    Returns:
        The path each region took: "pinned-mmap", "pinned-mmap+buffered" (part through the ring) or
        "buffered" (all through the ring).
    """
    wait_for_releases()
    helper = _Helper(while_copying)
    device = arena.device
    maps: dict[int, Mapping] = {}
    pinned: list[int] = []
    split = Split([(r.file_start, r.file_end) for r in regions])
    feeder: RingFeeder | None = None
    ring_threads = settings.warm_ring_threads
    stream = side_stream(device, torch.cuda.current_stream(device))
    timed_bytes, timed_seconds = 0, 0.0

    def ring_feeder(threads: int) -> RingFeeder:  # reads the files' tail, from the back, through the ring
        return RingFeeder(
            staging_ring(settings), split.back, regions, arena, threads, read_size=settings.read_size
        )

    try:
        cap = settings.register_chunk
        if ring_threads > 0 and split.left > 0 and (split.left >= RING_MIN_BYTES or ring_is_ready(settings)):
            feeder = ring_feeder(ring_threads)
            cap = min(cap, _RING_PIECE_CAP)
        with torch.cuda.stream(stream):
            first = True
            while True:
                if feeder is not None:
                    feeder.pump()
                if timed_bytes >= _PROBE_BYTES and timed_bytes / timed_seconds / 1e9 < SLOW_PIN_GBPS:
                    break
                piece = split.front(_piece(first, split.left, cap))
                if piece is None:
                    break
                first = False
                i, offset, n = piece
                m = maps.get(i)
                if m is None:
                    m = maps[i] = Mapping(regions[i].path, regions[i].file_end)
                t0 = time.perf_counter()
                # Register whole pages: the mapping covers them, the copy takes only file bytes.
                devices.host_register(m.address + offset, align_up(n, 4096))
                if timed_bytes < _PROBE_BYTES:
                    timed_bytes += n
                    timed_seconds += time.perf_counter() - t0
                pinned.append(m.address + offset)
                dst = regions[i].arena_offset + offset - regions[i].file_start
                if not devices.copy_to_device(arena.data_ptr() + dst, m.address + offset, n, stream):
                    arena[dst : dst + n].copy_(devices.host_view(m.address + offset, n), non_blocking=True)
                helper.start()
        helper.start()  # nothing was pinned (every region empty, or the probe switched at once)
        if feeder is None and split.left > 0:  # pinning was slow: the ring reads the rest
            feeder = ring_feeder(settings.cpu_threads)
        if feeder is not None:
            feeder.finish()
        helper.join()
        stream.synchronize()
    except BaseException:
        split.close()
        if feeder is not None:
            feeder.abort()
        helper.join(reraise=False)
        stream.synchronize()
        for address in pinned:
            devices.host_unregister(address)
        for m in maps.values():
            m.close()
        raise
    _release_later(pinned, list(maps.values()))
    ring = feeder.bytes if feeder is not None else [0] * len(regions)
    return [
        "pinned-mmap" if not r else ("buffered" if not p else "pinned-mmap+buffered")
        for p, r in zip(split.front_bytes, ring, strict=True)
    ]


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
