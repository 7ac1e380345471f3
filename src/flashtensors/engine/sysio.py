"""Thin OS layer: O_DIRECT opens, full-length positional reads, read-only mmaps, page-cache residency.

Python's ``os`` module covers pread/preadv but not ``mmap`` at a raw address (we need the address to pin
the pages for DMA) nor ``mincore``; those go through ctypes. Every function here releases the GIL while
the kernel works (ctypes and ``os.preadv`` both do), so reader threads really run in parallel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
DIRECT_ALIGN = 4096  # O_DIRECT wants offset, length and buffer aligned to the logical block size

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

_PROT_READ = 0x1
_PROT_WRITE = 0x2
_MAP_SHARED = 0x01
_MAP_PRIVATE = 0x02
_MAP_ANONYMOUS = 0x20
_MAP_POPULATE = 0x8000
_MAP_FAILED = ctypes.c_void_p(-1).value
MADV_SEQUENTIAL = 2
MADV_WILLNEED = 3
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23
RESIDENCY_SAMPLES = 256  # windows probed per range when a range is large
RESIDENCY_WINDOW = 16  # pages per window


def align_down(x: int, a: int) -> int:
    return x - (x % a)


def align_up(x: int, a: int) -> int:
    return -(-x // a) * a


def buffer_at(address: int, nbytes: int) -> memoryview:
    """A writable memoryview over raw memory (a pinned ring slot, a CPU arena, an mmap)."""
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


def open_direct(path: str | os.PathLike[str]) -> int | None:
    """Open for O_DIRECT reads; None where the filesystem refuses O_DIRECT (tmpfs, some FUSE/NFS)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_RDONLY | flag)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            return None
        raise


def pread_full(fd: int, view: memoryview, offset: int) -> int:
    """Read into all of ``view`` from ``offset``; stops early only at end of file. Returns bytes read."""
    done = 0
    total = len(view)
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


class Mapping:
    """A read-only shared mmap of a whole file (or, with path None, fresh anonymous memory, populated
    up front unless ``populate`` is False, in huge pages where ``huge`` and the kernel allow), addressed
    by its raw pointer."""

    def __init__(
        self, path: str | os.PathLike[str] | None, size: int, huge: bool = False, populate: bool = True
    ) -> None:
        self.size = size
        self.length = align_up(max(size, 1), PAGE)
        if path is None:
            flags = _MAP_PRIVATE | _MAP_ANONYMOUS | (_MAP_POPULATE if populate and not huge else 0)
            addr = _libc.mmap(None, self.length, _PROT_READ | _PROT_WRITE, flags, -1, 0)
            if huge and addr not in (None, _MAP_FAILED):
                # Ask for transparent huge pages, then fault everything in: zeroing and pinning 2 MiB
                # pages is cheaper than 4 KiB ones. Either advice may be refused (old kernel, THP off);
                # then the pages come at first touch or when cudaHostRegister pins them.
                _libc.madvise(addr, self.length, MADV_HUGEPAGE)
                if populate:
                    _libc.madvise(addr, self.length, MADV_POPULATE_WRITE)
        else:
            fd = os.open(path, os.O_RDONLY)
            try:
                addr = _libc.mmap(None, self.length, _PROT_READ, _MAP_SHARED, fd, 0)
            finally:
                os.close(fd)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap failed: {os.strerror(err)}", str(path or "anonymous"))
        self.address: int = addr

    def advise(self, advice: int, offset: int = 0, length: int | None = None) -> None:
        length = self.length - offset if length is None else length
        _libc.madvise(self.address + offset, length, advice)

    def resident_fraction(self, offset: int = 0, length: int | None = None) -> float:
        """Share of the pages in [offset, offset+length) that are in the page cache (mincore).

        Large ranges are sampled: ``RESIDENCY_SAMPLES`` windows of ``RESIDENCY_WINDOW`` pages spread
        evenly. A full scan asks the page cache about every page (measured: 30 ms per 4 GB file on the
        H100 machine, 0.12 s for a 16 GB model, all inside the load); the samples take well under 1 ms
        and page-cache state comes in long runs, so they tell warm from cold just as well.
        """
        start = align_down(offset, PAGE)
        end = self.length if length is None else align_up(offset + length, PAGE)
        pages = (end - start) // PAGE
        if pages <= 0:
            return 1.0
        if pages <= RESIDENCY_SAMPLES * RESIDENCY_WINDOW * 4:
            return self._resident(start, pages) / pages
        stride = (pages - RESIDENCY_WINDOW) // (RESIDENCY_SAMPLES - 1)
        found = sum(
            self._resident(start + i * stride * PAGE, RESIDENCY_WINDOW) for i in range(RESIDENCY_SAMPLES)
        )
        return found / (RESIDENCY_SAMPLES * RESIDENCY_WINDOW)

    def _resident(self, start: int, pages: int) -> int:
        """How many of ``pages`` pages from byte ``start`` (page-aligned) are resident; 0 on error."""
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(self.address + start, pages * PAGE, vec) != 0:
            return 0
        # Only bit 0 of each byte is defined (page resident); the kernel leaves the others zero.
        return pages - bytes(vec).count(0)

    def close(self) -> None:
        if self.address:
            _libc.munmap(self.address, self.length)
            self.address = 0

    def __enter__(self) -> Mapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def residency(path: str | os.PathLike[str], offset: int, size: int) -> float:
    """Share of [offset, size) of a file that sits in the page cache; 0.0 where it cannot be told."""
    if size <= offset:
        return 1.0
    try:
        with Mapping(path, size) as m:
            return m.resident_fraction(offset, size - offset)
    except OSError:
        return 0.0
