"""Put the page cache in a known state before a timed load: empty (cold) or holding the files (warm)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from flashtensors.errors import ConfigError

CHUNK = 16 * 1024**2
CACHE_DROP_METHODS = ("auto", "drop_caches", "fadvise")


def drop_cache(files: Sequence[str | Path], method: str = "auto") -> str:
    """Evict ``files`` from the page cache.

    ``drop_caches`` empties the whole cache (needs root, and is what BENCH.md asks for); ``fadvise`` asks
    the kernel to drop the pages of each file (``POSIX_FADV_DONTNEED``), which works unprivileged for
    clean pages. ``auto`` tries the first and falls back to the second.

    Args:
        files: the checkpoint files.
        method: ``auto``, ``drop_caches`` or ``fadvise``.

    Returns:
        The method that was used: ``drop_caches`` or ``fadvise``.

    Raises:
        ConfigError: an unknown method, or ``drop_caches`` asked for and refused.

    Example:
        >>> drop_cache(["model-00001-of-00002.safetensors"], "fadvise")  # doctest: +SKIP
        'fadvise'
    """
    if method not in CACHE_DROP_METHODS:
        raise ConfigError(f"unknown cache-drop method {method!r}; known: {', '.join(CACHE_DROP_METHODS)}")
    os.sync()  # dirty pages cannot be dropped: write them back first
    if method in ("auto", "drop_caches"):
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "drop_caches"
        except OSError as exc:
            if method == "drop_caches":
                raise ConfigError(
                    f"cannot write /proc/sys/vm/drop_caches ({exc.strerror})",
                    hint="run as root, or use `--cache-drop fadvise`",
                ) from exc
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


def chunks(
    files: Sequence[str | Path], limit: int | None = None, size: int = 0
) -> list[tuple[str, int, int]]:
    """Split files into ``(path, offset, length)`` reads of ``size`` bytes (0: :data:`CHUNK`, the most
    :func:`timed_parallel_read` takes), at most ``limit`` in all."""
    step = size or CHUNK
    if not 0 < step <= CHUNK or step % 4096:
        raise ValueError(f"read size must be a multiple of 4096 up to {CHUNK}, not {size}")
    out: list[tuple[str, int, int]] = []
    total = 0
    for path in files:
        file_size = os.path.getsize(path)
        for offset in range(0, file_size, step):
            length = min(step, file_size - offset)
            if limit is not None and total + length > limit:
                return out if out else [(str(path), offset, min(length, limit))]
            out.append((str(path), offset, length))
            total += length
    return out


def parallel_read(work: list[tuple[str, int, int]], threads: int, *, direct: bool = False) -> int:
    """Read every ``(path, offset, length)`` with ``threads`` threads; returns the bytes read.

    See :func:`timed_parallel_read`, which also says how long the reads took.
    """
    return timed_parallel_read(work, threads, direct=direct)[0]


def timed_parallel_read(
    work: list[tuple[str, int, int]], threads: int, *, direct: bool = False
) -> tuple[int, float]:
    """Read every ``(path, offset, length)`` with ``threads`` threads into scratch buffers.

    Each thread reads into its own :data:`CHUNK`-byte buffer, in transparent huge pages where the
    kernel gives them, allocated and faulted in before the clock starts. The buffer matters for
    O_DIRECT on a virtual disk: a request reaches the disk in at most ``max_segments`` physically
    contiguous pieces. On this project's CPU machine (virtio, 254 segments, 4 MiB requests), O_DIRECT
    reads into 4 KiB pages ran at 0.7-1.1 GB/s, and into 2 MiB pages at 2.9-3.5 GB/s. Our loader
    reads into huge pages, so a limit measured with 4 KiB buffers would understate the disk.

    With ``direct``, files are opened with ``O_DIRECT`` and reads use lengths rounded up to 4 KiB (a
    short read at the end of a file is normal).

    Returns:
        ``(bytes read, seconds)``, the seconds covering the reads only.

    Raises:
        OSError: the read failed (``EINVAL`` from ``open`` when the filesystem refuses O_DIRECT).
    """
    from flashtensors.engine.sysio import Mapping, buffer_at

    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fds: dict[str, int] = {}
    buffers: list[Mapping] = []
    lock = threading.Lock()
    queue: Iterator[tuple[str, int, int]] = iter(work)
    totals: list[int] = []
    errors: list[BaseException] = []

    def run(buf: Mapping) -> None:
        view = buffer_at(buf.address, CHUNK)
        done = 0
        try:
            while True:
                with lock:
                    item = next(queue, None)
                if item is None:
                    break
                path, offset, length = item
                want = (length + 4095) & ~4095 if direct else length
                done += min(os.preadv(fds[path], [view[:want]], offset), length)
        except BaseException as exc:  # surfaced in the caller's thread below
            errors.append(exc)
        finally:
            totals.append(done)

    try:
        for path, _, _ in work:
            if path not in fds:
                fds[path] = os.open(path, flags)
        buffers = [Mapping(None, CHUNK, huge=True) for _ in range(max(1, threads))]
        pool = [threading.Thread(target=run, args=(b,), daemon=True) for b in buffers]
        t0 = time.perf_counter()
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        seconds = time.perf_counter() - t0
    finally:
        for fd in fds.values():
            os.close(fd)
        for b in buffers:
            b.close()
    if errors:
        raise errors[0]
    return sum(totals), seconds


def is_resident(path: str | Path) -> bool:
    """Whether every sampled page of ``path`` is in the page cache (sampled: well under 1 ms a file)."""
    from flashtensors.engine.sysio import residency

    return residency(path, 0, os.path.getsize(path)) >= 1.0


def warm_cache(files: Sequence[str | Path], threads: int = 1) -> int:
    """Bring ``files`` into the page cache (like ``cat f > /dev/null``); returns the bytes read.

    One thread reads each file from start to end, as ``cat``, a download or a model server's first
    load would. How the cache is filled matters: on the H100 machine (kernel with large page-cache
    folios), pages read sequentially land in large folios and pin for DMA at 35-42 GB/s, pages read by
    8 threads at scattered 16 MiB offsets land in small ones and pin at ~14 GB/s.

    A file whose pages are all resident already is not read again: re-reading a 16 GB checkpoint costs
    3-5 s per run and changes nothing. Residency is sampled, so a file with a few evicted pages between
    the samples counts as resident; eviction happens in long runs of pages, which the samples catch.

    Example:
        >>> warm_cache(["model.safetensors"])  # doctest: +SKIP
        0
    """
    cold = [path for path in files if not is_resident(path)]
    return parallel_read(chunks(cold), threads) if cold else 0
