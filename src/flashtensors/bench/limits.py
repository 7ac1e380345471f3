"""The physical limits a load is compared against, measured on the same files in the same run.

* disk: raw ``O_DIRECT`` reads of the checkpoint into huge-page buffers (as our loader reads), 16 MiB
  each with 1/4/8/16 threads and 512 KiB each with 16 threads, the best of them, cache dropped (the
  runner repeats it between the cold runs, because this virtual disk speeds up on re-reads);
* page cache: buffered reads of the same bytes once they are cached, best of several thread counts;
* pinned host->GPU copy of >= 2 GiB, timed with CUDA events (GPU only);
* pinning the page cache in place: cudaHostRegister of the cached files, one call per file (GPU only).
  A warm load that DMAs from the page cache cannot finish before its pages are pinned, so with PCIe
  this bounds that path; the page-cache read bounds the other (copying through pinned buffers);
* host memcpy of a large buffer (the hot/warm ceiling on CPU).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flashtensors.bench.cache import CHUNK, chunks, drop_cache, timed_parallel_read, warm_cache

DISK_THREADS = (1, 4, 8, 16)  # in CHUNK (16 MiB) requests
# (threads, bytes per request) tried besides: in two leases of the H100 machine (twelfth session), 16
# threads of 512 KiB requests read the same files 13-21% faster than 8 threads of 16 MiB
# (benches/probes/cold2.py).
DISK_SMALL_REQUESTS = ((16, 512 * 1024),)
PAGE_CACHE_THREADS = (4, 8, 16)
GiB = 1024**3


def _best_gbps(fn: Any, repeats: int) -> tuple[float, list[float]]:
    """Run ``fn() -> (bytes, seconds)`` ``repeats`` times; best GB/s and every figure."""
    figures = []
    for _ in range(repeats):
        nbytes, seconds = fn()
        figures.append(nbytes / seconds / 1e9 if seconds > 0 else 0.0)
    return max(figures), figures


def shape_name(threads: int, request: int) -> str:
    """``8x16M``, ``16x512K``: a disk read's threads and bytes per request."""
    size = f"{request // 1024**2}M" if request % 1024**2 == 0 else f"{request // 1024}K"
    return f"{threads}x{size}"


def disk_read(
    files: Sequence[str | Path],
    threads: int,
    cache_drop: str = "auto",
    *,
    limit: int | None = None,
    direct: bool = True,
    request: int = CHUNK,
) -> dict[str, Any]:
    """Drop the cache, then read ``files`` (their first ``limit`` bytes) in ``request``-byte requests
    (16 MiB unless told) by ``threads``.

    This is one raw disk measurement: the limits step runs it for each thread count, and the cold
    scenario runs it once per repeat, between the loaders, at the best count the limits step found.

    Args:
        files: the checkpoint files.
        threads: reader threads.
        request: bytes per read request (a multiple of 4096, at most 16 MiB).
        cache_drop: how to empty the page cache first (see :func:`drop_cache`).
        limit: read at most this many bytes (None: every byte of every file).
        direct: O_DIRECT reads; where the filesystem refuses them (tmpfs), buffered reads right after
            another cache drop stand in, and ``method`` says so.

    Returns:
        ``{"threads", "request", "method": "O_DIRECT" | "buffered-after-drop", "cache_drop", "bytes",
        "seconds", "gbps"}``, plus ``note`` when O_DIRECT was refused.

    Raises:
        OSError: a read failed other than by O_DIRECT being refused.
    """
    work = chunks(files, limit, request)
    out: dict[str, Any] = {
        "threads": threads,
        "request": request,
        "method": "O_DIRECT" if direct else "buffered-after-drop",
    }
    out["cache_drop"] = drop_cache(files, cache_drop)
    try:
        got, seconds = timed_parallel_read(work, threads, direct=direct)
    except OSError as exc:
        if not direct:
            raise
        out["method"] = "buffered-after-drop"
        out["note"] = f"O_DIRECT refused ({exc.strerror}); buffered reads after a cache drop instead"
        drop_cache(files, cache_drop)
        got, seconds = timed_parallel_read(work, threads)
    out.update(bytes=got, seconds=seconds, gbps=got / seconds / 1e9 if seconds > 0 else 0.0)
    return out


def disk_bandwidth(files: Sequence[str | Path], limit: int, cache_drop: str = "auto") -> dict[str, Any]:
    """Raw O_DIRECT read bandwidth of ``files`` (first ``limit`` bytes), best over thread counts in
    16 MiB requests and over :data:`DISK_SMALL_REQUESTS`.

    Returns:
        ``{"gbps": best, "best_threads": n, "best_request": bytes, "threads": {n: gbps} (16 MiB
        requests), "shapes": {"8x16M": gbps, "16x512K": gbps, ...}, "bytes": read, "method": "O_DIRECT"
        | "buffered-after-drop", "cache_drop": method}``; where the filesystem refuses O_DIRECT (tmpfs),
        buffered reads right after a cache drop stand in and ``method`` says so.
    """
    result: dict[str, Any] = {"threads": {}, "shapes": {}}
    direct = True
    best: tuple[float, int, int] | None = None
    for n, request in [(n, CHUNK) for n in DISK_THREADS] + list(DISK_SMALL_REQUESTS):
        one = disk_read(files, n, cache_drop, limit=limit, direct=direct, request=request)
        direct = one["method"] == "O_DIRECT"  # refused once: every later count reads buffered too
        if request == CHUNK:
            result["threads"][str(n)] = one["gbps"]
        result["shapes"][shape_name(n, request)] = one["gbps"]
        result.update({k: one[k] for k in ("method", "cache_drop", "bytes", "note") if k in one})
        if best is None or one["gbps"] > best[0]:
            best = (one["gbps"], n, request)
    assert best is not None
    result.update(gbps=best[0], best_threads=best[1], best_request=best[2])
    return result


def page_cache_bandwidth(files: Sequence[str | Path], limit: int) -> dict[str, Any]:
    """Buffered read bandwidth of bytes already in the page cache, best over thread counts."""
    work = chunks(files, limit)
    warm_cache([p for p in {w[0] for w in work}])
    result: dict[str, Any] = {"threads": {}}
    for n in PAGE_CACHE_THREADS:
        best, _ = _best_gbps(lambda n=n: timed_parallel_read(work, n), 2)
        result["threads"][str(n)] = best
    result["gbps"] = max(result["threads"].values())
    result["bytes"] = sum(w[2] for w in work)
    return result


def memcpy_bandwidth(nbytes: int = GiB) -> dict[str, Any]:
    """Host memcpy (torch ``copy_``, its own threads) of ``nbytes``; bytes copied per second."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)  # zeros: pages faulted in before the clock

    def once() -> tuple[int, float]:
        t0 = time.perf_counter()
        dst.copy_(src)
        return nbytes, time.perf_counter() - t0

    once()
    best, figures = _best_gbps(once, 3)
    return {"gbps": best, "runs": figures, "bytes": nbytes}


def h2d_bandwidth(nbytes: int = 2 * GiB, device: str = "cuda") -> dict[str, Any]:
    """Pinned host -> GPU copy of ``nbytes``, timed with CUDA events; best of 3 after a warm-up."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def once() -> tuple[int, float]:
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        return nbytes, start.elapsed_time(end) / 1e3

    once()
    best, figures = _best_gbps(once, 3)
    return {"gbps": best, "runs": figures, "bytes": nbytes}


def pin_bandwidth(files: Sequence[str | Path], limit: int, repeats: int = 2) -> dict[str, Any]:
    """Pin the cached pages of ``files`` (their first ``limit`` bytes) in place: one cudaHostRegister
    (read-only) per file over a fresh read-only mapping, timed, then unregistered; best of ``repeats``.

    The files are read into the page cache first (where they are not already). One call per file is
    the fastest way to pin measured on the H100 machine (~42 GB/s against ~35 in 1 GiB pieces), so this
    is the rate no warm load that DMAs from the page cache can beat.
    """
    from flashtensors.engine import devices
    from flashtensors.engine.sysio import Mapping, align_up

    spans: list[tuple[Path, int]] = []
    left = limit
    for f in files:
        n = min(os.path.getsize(f), left)
        if n > 0:
            spans.append((Path(f), n))
        left -= n
    warm_cache([p for p, _ in spans])

    def once() -> tuple[int, float]:
        maps = [Mapping(p, n) for p, n in spans]
        pinned: list[int] = []
        try:
            t0 = time.perf_counter()
            for m in maps:
                devices.host_register(m.address, align_up(m.length, 4096))
                pinned.append(m.address)
            seconds = time.perf_counter() - t0
        finally:
            for address in pinned:
                devices.host_unregister(address)
            for m in maps:
                m.close()
        return sum(n for _, n in spans), seconds

    best, figures = _best_gbps(once, repeats)
    return {"gbps": best, "runs": figures, "bytes": sum(n for _, n in spans), "calls": len(spans)}


def _filesystem(path: Path) -> str:
    """The filesystem type holding ``path`` (longest matching mount point in /proc/mounts)."""
    best, fstype = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mount = parts[1]
                if str(path).startswith(mount) and len(mount) > len(best):
                    best, fstype = mount, f"{parts[2]} ({parts[0]} on {mount})"
    except OSError:
        pass
    return fstype


def machine_info(device: str, checkpoint: Path) -> dict[str, Any]:
    """What the figures were measured on: card, torch, CPU, memory, filesystem, date."""
    import torch

    import flashtensors

    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "flashtensors": flashtensors.__version__,
        "kernel": platform.release(),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "filesystem": _filesystem(checkpoint.resolve()),
    }
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_bytes"] = pages * page
    except (ValueError, OSError):
        pass
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_bytes"] = props.total_memory
        info["gpu_count"] = torch.cuda.device_count()
    return info


def measure_limits(
    files: Sequence[str | Path],
    *,
    device: str,
    limit_bytes: int,
    h2d_bytes: int = 2 * GiB,
    memcpy_bytes: int = GiB,
    cache_drop: str = "auto",
) -> dict[str, Any]:
    """Every limit for ``device`` on ``files``; each entry has a ``gbps`` (or ``error`` if it failed).

    Args:
        files: the checkpoint's safetensors files.
        device: ``cpu`` or ``cuda[:N]``.
        limit_bytes: read at most this many bytes of the files per disk/page-cache measurement.
        h2d_bytes: size of the pinned host->GPU copy.
        memcpy_bytes: size of the host memcpy.
        cache_drop: how to empty the page cache before disk reads (see :func:`drop_cache`).

    Returns:
        ``{"disk": {...}, "page_cache": {...}, "memcpy": {...}, "h2d_pinned": {...},
        "page_cache_pin": {...}}`` (the last two on GPU only).
    """
    out: dict[str, Any] = {}
    steps: list[tuple[str, Any]] = [
        ("disk", lambda: disk_bandwidth(files, limit_bytes, cache_drop)),
        ("page_cache", lambda: page_cache_bandwidth(files, limit_bytes)),
        ("memcpy", lambda: memcpy_bandwidth(memcpy_bytes)),
    ]
    if device.startswith("cuda"):
        steps.append(("h2d_pinned", lambda: h2d_bandwidth(h2d_bytes, device)))
        steps.append(("page_cache_pin", lambda: pin_bandwidth(files, limit_bytes)))
    for name, step in steps:
        try:
            out[name] = step()
        except Exception as exc:  # one failed measurement must not hide the others
            out[name] = {"gbps": None, "error": f"{type(exc).__name__}: {exc}"}
    return out


def limit_for(scenario: str, limits: dict[str, Any], device: str) -> tuple[float | None, str]:
    """The ceiling a scenario is compared with, and its name.

    cold: the disk's O_DIRECT rate, from the reads interleaved with the cold runs (``disk_interleaved``,
    their median) where there are any, else from the limits step at the start (``disk``); warm on GPU:
    the faster of the two ways cached bytes can reach the GPU, each capped by PCIe: pinning the pages
    in place (``page_cache_pin``) or reading them into pinned buffers (``page_cache``); warm on CPU:
    min(page cache, memcpy); hot: pinned PCIe on GPU, memcpy on CPU; e2e: no ceiling (None).
    """

    def gbps(key: str) -> float | None:
        value = limits.get(key, {}).get("gbps")
        return float(value) if value else None

    link = "h2d_pinned" if device.startswith("cuda") else "memcpy"
    if scenario == "cold":
        interleaved = gbps("disk_interleaved")
        return (interleaved, "disk_interleaved") if interleaved else (gbps("disk"), "disk")
    if scenario == "warm":
        ways = ["page_cache", "page_cache_pin"] if device.startswith("cuda") else ["page_cache"]
        capped = []
        for way in ways:
            rate = gbps(way)
            if rate:  # a way that failed to measure bounds nothing
                capped.append(min([(rate, way)] + ([(gbps(link), link)] if gbps(link) else [])))
        return max(capped) if capped else (None, "")
    if scenario == "hot":
        return gbps(link), link
    return None, ""
