"""Our CUDA streams for copies into the arena: a bounded pool per device, one stream per reader thread,
and priming of the copy path in a fresh process."""

from __future__ import annotations

import threading

import torch

from flashtensors.engine import devices
from flashtensors.engine.sysio import DIRECT_ALIGN

_streams = threading.local()
_STREAMS_PER_DEVICE = 16
_pool: dict[torch.device, list[torch.cuda.Stream]] = {}
_pool_turn: dict[torch.device, int] = {}
_pool_lock = threading.Lock()


def pooled_stream(device: torch.device, avoid: torch.cuda.Stream | None = None) -> torch.cuda.Stream:
    """One of at most ``_STREAMS_PER_DEVICE`` streams of ours per device, handed out in turn; a new one
    is made when every stream made so far was handed out once (reader threads come and go with each
    load; the streams stay). Never ``avoid`` while the pool has another: the warm split's ring must not
    queue its copies behind the pinning thread's own (once the pool is full, its turn came 1 time in 16).
    """
    with _pool_lock:
        streams = _pool.setdefault(device, [])
        for _ in range(2):  # the next turn is another stream, or a new one (the pool holds 2 or more)
            turn = _pool_turn.get(device, 0)
            _pool_turn[device] = turn + 1
            if turn >= len(streams) and len(streams) < _STREAMS_PER_DEVICE:
                streams.append(devices.new_stream(device))
            stream = streams[turn % len(streams)]
            if stream is not avoid:
                break
        return stream


def own_side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """This thread's side stream on ``device`` (:func:`side_stream`), or None before it has one."""
    cache = getattr(_streams, "by_device", None)
    return None if cache is None else cache.get(device)


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
        stream = cache[device] = pooled_stream(device)
    stream.wait_stream(caller)
    return stream
