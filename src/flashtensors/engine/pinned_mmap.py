"""The ``pinned-mmap`` read path (GPU only): pin a file's page cache in place and DMA from it.

The file is mapped read-only and registered with cudaHostRegister in pieces (:func:`pin_schedule`); each
piece is copied to the GPU as soon as it is pinned, while the next one is pinned. Where the page cache
pins too slowly, the rest of the load goes through the staging ring (:mod:`flashtensors.engine.readers`).
Pinned pieces are unpinned in the background once their data is on the GPU. What a warm file wants.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from flashtensors.config import Settings
from flashtensors.engine import devices
from flashtensors.engine.plan import FileRegion
from flashtensors.engine.readers import read_through_ring, side_stream
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
