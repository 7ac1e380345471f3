"""The cold O_DIRECT loop in C (``ringread.c``): reader threads that each read into a slot of their own and
copy it, with no Python and no GIL between two reads.

Why: in the Python loop (:class:`flashtensors.engine.ring_feeder.RingFeeder`) every hand-off of a slot
waits for the GIL among 17 threads. On the H200 machine a full slot took 1.2-1.9 ms to come back to a
reader against ~10 us of copy, the readers waited for slots, and cold 8B loads read 0.83-0.88 of the
raw O_DIRECT rate of the same files (docs/perf-notes.md, nineteenth and twentieth sessions). Each reader
reads into a slot of its own and copies it itself, so the reads land in as few places as a raw read's
(16 slots of 512 KiB, against 24 when the readers handed their slots to one copier thread): 0.97 of raw
against the copier's 0.90 (8B, 5 rounds), and the bench's cold loads 92-99% of the disk against 74-83%
(twenty-first session); a second lease read 97-108% of the disk in six of eight runs, and the copier
was removed.

The install builds it (``setup.py``, ``_ringread*.so`` beside this module) where a C compiler is found;
it is used while its source tag matches this source. Otherwise it is built on first use with the
system's C compiler (``$CC``, ``cc`` or ``gcc``), into ``~/.cache/flashtensors/native``
(``$XDG_CACHE_HOME`` is honoured), once per source version: 0.31 s, inside the first cold load that
needs it. Where no compiler is found or the build fails, :func:`library` returns None, the reason is in
:func:`unavailable_reason`, and the loads use the Python loop, which reads the same bytes. The setting
``native_reads`` (``FLASH_NATIVE_READS=0``) turns the C loop off.

:func:`read_regions` is the binding (host memory on CPU, for the tests; a device arena on a GPU);
:func:`read_ring` runs a cold load through it with the O_DIRECT staging ring, on the caller's current
stream, with an event per reader (:mod:`flashtensors.engine.events`).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from flashtensors.config import Settings
from flashtensors.engine import devices, events
from flashtensors.engine.plan import FileRegion
from flashtensors.engine.readers import ReadWindow, shrank
from flashtensors.engine.staging import direct_slot_size, staging_ring
from flashtensors.engine.sysio import open_direct
from flashtensors.errors import DeviceError

_SOURCE = "ringread.c"

# ft_ring_finish's codes (ringread.c)
_OK, _EREAD, _ESHRANK, _ECUDA, _ESTOPPED, _ETHREAD, _EPIN = range(7)

_lib: ctypes.CDLL | None = None
_why = ""
_tried = False
_lock = threading.Lock()


class _Region(ctypes.Structure):
    _fields_ = [
        ("fd", ctypes.c_int64),
        ("file_start", ctypes.c_int64),
        ("file_end", ctypes.c_int64),
        ("arena_offset", ctypes.c_int64),
    ]


class _Load(ctypes.Structure):
    """The public head of ``struct ft_load``; the C side's private fields follow it in the same buffer
    (:func:`_new_load` sizes it with ``ft_load_size``)."""

    _fields_ = [
        ("regions", ctypes.c_void_p),
        ("nregions", ctypes.c_int64),
        ("ring", ctypes.c_void_p),
        ("slot_size", ctypes.c_int64),
        ("nslots", ctypes.c_int64),
        ("arena", ctypes.c_void_p),
        ("threads", ctypes.c_int64),
        ("device", ctypes.c_int64),
        ("stream", ctypes.c_void_p),
        ("events", ctypes.c_void_p),
        ("memcpy_async", ctypes.c_void_p),
        ("event_record", ctypes.c_void_p),
        ("event_sync", ctypes.c_void_p),
        ("set_device", ctypes.c_void_p),
        ("host_register", ctypes.c_void_p),
        ("register_flags", ctypes.c_int64),
        ("pinned", ctypes.c_void_p),
        ("error", ctypes.c_int64),
        ("err_errno", ctypes.c_int64),
        ("err_region", ctypes.c_int64),
        ("cuda_error", ctypes.c_int64),
        ("first_read", ctypes.c_double),
        ("last_read", ctypes.c_double),
        ("reads", ctypes.c_int64),
        ("copies", ctypes.c_int64),
        ("read_s", ctypes.c_double),
        ("pin_s", ctypes.c_double),
    ]


class DirectRefused(Exception):
    """A filesystem took O_DIRECT at open but refused a read (EINVAL): load through the Python loop,
    which reads such files through the page cache."""


@dataclass
class Stats:
    """What one native load did: the window of its reads (``perf_counter`` seconds), its reads, copies,
    and the reads' own time (summed: over the window, the mean number of reads in flight)."""

    first_read: float
    last_read: float
    reads: int
    copies: int
    read_s: float
    pin_s: float  # time spent pinning slots at their first copy, summed over the threads


last_stats: Stats | None = None  # the process's last native load, for the probes (benches/probes)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flashtensors" / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CC", ""), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


def _tag(source: bytes) -> str:
    return hashlib.sha256(source).hexdigest()[:16]


def _packaged(tag: str, folder: Path | None = None) -> ctypes.CDLL | None:
    """The library the install built beside this module (or in ``folder``), if its source tag is
    ``tag``: an install older than the source is not used."""
    for path in sorted((folder or Path(__file__).parent).glob("_ringread*.so")):
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        lib.ft_source_tag.restype = ctypes.c_char_p
        if lib.ft_source_tag() == tag.encode():
            return lib
    return None


def _build(source: bytes, target: Path) -> str:
    """Compile ``source`` into ``target`` (written whole, then renamed: a concurrent build or a crash
    leaves no half-written library); "" on success, else why not."""
    cc = _compiler()
    if cc is None:
        return "no C compiler found (set CC, or install gcc)"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / _SOURCE
        src.write_bytes(source)
        out = Path(tmp) / target.name
        tag = f'-DFT_SOURCE_TAG="{_tag(source)}"'
        cmd = [cc, "-O2", "-shared", "-fPIC", "-pthread", tag, "-o", str(out), str(src)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{cc} failed to run: {exc}"
        if done.returncode != 0:
            return f"{cc} failed: {done.stderr.strip()[-500:]}"
        os.replace(out, target)
    return ""


def library() -> ctypes.CDLL | None:
    """The built C loop, or None where it cannot be built or loaded (see :func:`unavailable_reason`)."""
    global _lib, _why, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        try:
            source = resources.files("flashtensors.engine").joinpath(_SOURCE).read_bytes()
            lib = _packaged(_tag(source))
            if lib is None:
                target = _cache_dir() / f"ringread-{_tag(source)}-{platform.machine()}.so"
                if not target.exists():
                    _why = _build(source, target)
                    if _why:
                        return None
                lib = ctypes.CDLL(str(target))
        except OSError as exc:
            _why = f"the C loop could not be built or loaded: {exc}"
            return None
        lib.ft_load_size.restype = ctypes.c_size_t
        for name in ("ft_ring_start", "ft_ring_finish", "ft_ring_wait"):
            getattr(lib, name).restype = ctypes.c_int64
        lib.ft_ring_start.argtypes = [ctypes.c_void_p]
        lib.ft_ring_finish.argtypes = [ctypes.c_void_p]
        lib.ft_ring_wait.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        lib.ft_ring_stop.argtypes = [ctypes.c_void_p]
        _lib = lib
        return _lib


def unavailable_reason() -> str:
    """Why :func:`library` returned None ("" when it did not, or was not asked yet)."""
    return _why


def read_regions(
    regions: Sequence[FileRegion],
    fds: Sequence[int],
    arena: int,
    ring: int,
    slot_size: int,
    nslots: int,
    threads: int,
    *,
    device: int = 0,
    stream: int = 0,
    events: int = 0,
    entry_points: dict[str, int] | None = None,
    while_reading: Callable[[], None] | None = None,
    pinned: bytearray | None = None,
) -> Stats:
    """Read ``regions`` (opened as ``fds``, O_DIRECT or not) through ``nslots`` slots of ``slot_size``
    bytes at host address ``ring`` (page-aligned) into the arena at ``arena``, with
    ``min(threads, nslots)`` readers: reader t reads into slot t only and copies it itself.

    With ``entry_points`` (:meth:`flashtensors.engine.devices._Runtime.entry_points`), ``arena`` is a
    device address on ``device``; the copies go on ``stream`` (a cudaStream_t that already waits for
    whatever made the arena), and ``events`` is the address of an array of one cudaEvent_t per reader:
    reader t records event t behind each copy of its slot and waits on it before reading into the slot
    again, so every copy is done when this returns. Without, ``arena`` is host memory and the copies are
    ``memcpy``. ``while_reading`` runs on this thread while the first reads fly.

    ``pinned`` (one byte per slot) says which slots are pinned already; with ``entry_points``, each other
    slot is pinned at its first copy by its reader, and its byte set to 1.

    Raises:
        ValueError: ``entry_points`` without ``events``.
        DirectRefused: an O_DIRECT read was refused (EINVAL); nothing is left running.
        OSError: a read failed (the path and errno are in it).
        FormatError: a file ended before its region did.
        DeviceError: the runtime refused a copy, an event or a slot's pin.
        RuntimeError: the C loop is not available (check :func:`library` first).
    """
    global last_stats
    lib = library()
    if lib is None:
        raise RuntimeError(f"the native read loop is not available: {unavailable_reason()}")
    if entry_points is not None and not events:
        raise ValueError("read_regions: entry_points need an array of one event per reader (events)")
    table = (_Region * max(1, len(regions)))()
    for k, (r, fd) in enumerate(zip(regions, fds, strict=True)):
        table[k] = _Region(fd, r.file_start, r.file_end, r.arena_offset)
    buf = ctypes.create_string_buffer(max(int(lib.ft_load_size()), ctypes.sizeof(_Load)))
    ld = _Load.from_buffer(buf)
    ld.regions, ld.nregions = ctypes.addressof(table), len(regions)
    ld.ring, ld.slot_size, ld.nslots = ring, slot_size, nslots
    ld.arena, ld.threads, ld.device = arena, max(1, threads), device
    ld.stream, ld.events = stream or None, events or None
    if entry_points is not None:
        ld.memcpy_async = entry_points["cudaMemcpyAsync"]
        ld.event_record = entry_points["cudaEventRecord"]
        ld.event_sync = entry_points["cudaEventSynchronize"]
        ld.set_device = entry_points["cudaSetDevice"]
        if pinned is not None:
            ld.host_register = entry_points["cudaHostRegister"]
    flags = (ctypes.c_int8 * max(1, nslots)).from_buffer(pinned) if pinned is not None else None
    ld.pinned = ctypes.addressof(flags) if flags is not None else None
    address = ctypes.addressof(buf)
    if lib.ft_ring_start(address) == _OK:
        try:
            if while_reading is not None:
                while_reading()
            while not lib.ft_ring_wait(address, 200):  # the GIL is let go; interrupts come between
                pass
        except BaseException:
            lib.ft_ring_stop(address)
            lib.ft_ring_finish(address)
            raise
    code = int(lib.ft_ring_finish(address))
    last_stats = Stats(ld.first_read, ld.last_read, ld.reads, ld.copies, ld.read_s, ld.pin_s)
    if code == _OK:
        return last_stats
    path = regions[ld.err_region].path if 0 <= ld.err_region < len(regions) else None
    if code == _EREAD:
        if ld.err_errno == errno.EINVAL:
            raise DirectRefused(str(path))
        raise OSError(int(ld.err_errno), os.strerror(int(ld.err_errno)), str(path))
    if code == _ESHRANK:
        raise shrank(path)
    if code == _ECUDA:
        raise DeviceError(
            f"cudaMemcpyAsync or an event of the cold read failed with CUDA error {ld.cuda_error}",
            hint="check `nvidia-smi` for the GPU's state; a GPU reset or a driver restart may be needed",
        )
    if code == _EPIN:
        raise DeviceError(
            f"pinning a {slot_size // 1024} KiB staging slot for the cold read (cudaHostRegister) failed "
            f"with CUDA error {ld.cuda_error}",
            hint="the process may be over its locked-memory limit (`ulimit -l`; in a container, its "
            "memlock limit) or the host short of memory: raise the limit or free memory, then load again",
        )
    if code == _ETHREAD:
        raise OSError(
            int(ld.err_errno), f"could not start the read threads: {os.strerror(int(ld.err_errno))}"
        )
    raise RuntimeError(f"the native read loop stopped with code {code}")


def takes_cold_loads(settings: Settings) -> bool:
    """Whether ``settings`` send cold O_DIRECT loads to the C loop (``native_reads`` on, ``read_size``
    auto); :func:`read_ring` may still hand one back to the Python loop."""
    return settings.native_reads and not settings.read_size


def read_ring(
    regions: list[FileRegion],
    arena: torch.Tensor,
    settings: Settings,
    threads: int,
    nbytes: int,
    window: ReadWindow | None,
    while_reading: Callable[[], None],
) -> bool:
    """Read a cold O_DIRECT load by the C loop, with ``threads`` readers through the O_DIRECT staging
    ring, on the current device; False where it cannot take the load (not built, the runtime not
    callable directly, a file that refuses O_DIRECT at open or at a read), which the Python loop
    (:func:`flashtensors.engine.ring_feeder.read_through_ring`) then reads."""
    rt = devices.runtime()
    points = rt.entry_points()
    if points is None or library() is None:
        return False
    fds: list[int] = []
    try:
        for r in regions:
            fd = open_direct(r.path)
            if fd is None:
                return False
            fds.append(fd)
        ring = staging_ring(settings, threads, nbytes, direct_slot_size(settings), True)
        with ring.lock:
            for slot in ring.slots:
                if slot.event is not None:
                    slot.event.synchronize()  # a copy of the Python loop's, from an earlier load
                    slot.event = None
            # Slots not pinned yet are pinned at their first copy, in C, while the other reads fly, so
            # only the slots the readers use are pinned (16 of 24).
            pinned = bytearray(int(slot.pinned) for slot in ring.slots)
            # The copies go on the caller's current stream, after whatever made the arena, as a
            # `.to(device)` would: no stream of our own to make before the first read (torch's pool
            # of them took 14-16 ms to make in a fresh process; firstread.py, twenty-second session).
            stream = torch.cuda.current_stream(arena.device)
            readers = min(threads, len(ring.slots))  # one slot each
            index = torch.cuda.current_device()
            made = events.take(index, readers)  # one a reader
            if made is None:
                return False
            try:
                table = (ctypes.c_void_p * len(made))(*made)
                stats = read_regions(
                    regions,
                    fds,
                    arena.data_ptr(),
                    ring.buffer.address,
                    ring.slot_size,
                    len(ring.slots),
                    readers,
                    device=index,
                    stream=stream.cuda_stream,
                    events=ctypes.addressof(table),
                    entry_points=points,
                    while_reading=while_reading,
                    pinned=pinned,
                )
            except DirectRefused:
                return False
            finally:
                events.give(index, made)  # read_regions returns after every copy it queued is done
                for slot, now_pinned in zip(ring.slots, pinned, strict=True):
                    if now_pinned and not slot.pinned:
                        ring.buffer.adopt(slot.offset)
                        slot.pinned = True
    finally:
        for fd in fds:
            os.close(fd)
    if window is not None and stats.reads:
        window.note(stats.first_read, stats.last_read)
    return True
