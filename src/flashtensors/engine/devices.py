"""Devices and the few CUDA runtime calls torch does not wrap: pinning memory we did not allocate."""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import torch

from flashtensors.engine.sysio import DIRECT_ALIGN, MADV_POPULATE_WRITE, Mapping, buffer_at
from flashtensors.errors import DeviceError

_READ_ONLY = 0x08  # cudaHostRegisterReadOnly: the device only reads the pages
_DEFAULT = 0x00
_NON_BLOCKING = 0x01  # cudaStreamNonBlocking, as torch's own streams
_DISABLE_TIMING = 0x02  # cudaEventDisableTiming: the cheapest event to record and wait on
_HOST_TO_DEVICE = 1  # cudaMemcpyHostToDevice
# The runtime calls the C read loop makes (engine/ringread.c), by address: _Runtime.entry_points.
ENTRY_POINTS = (
    "cudaMemcpyAsync",
    "cudaEventRecord",
    "cudaEventSynchronize",
    "cudaSetDevice",
    "cudaHostRegister",
)


def resolve_device(device: str | int | torch.device | None) -> torch.device:
    """Turn "cpu", "cuda", "cuda:1", 0, torch.device(...) into a concrete device; check it is usable."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, int):
        device = torch.device("cuda", device)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"not a device: {device!r}", hint='use "cpu", "cuda" or "cuda:N"') from exc
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DeviceError(f"device type {dev.type!r} is not supported", hint='use "cpu", "cuda" or "cuda:N"')
    if not torch.cuda.is_available():
        raise DeviceError(
            f"{device!r} was asked for but CUDA is not available on this machine",
            hint='load with device="cpu" (CLI: --device cpu)',
        )
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise DeviceError(
            f"cuda:{index} does not exist ({torch.cuda.device_count()} GPU(s) visible)",
            hint="pick a device index below the count, or check CUDA_VISIBLE_DEVICES",
        )
    return torch.device("cuda", index)


def allocate_arena(nbytes: int, device: torch.device) -> torch.Tensor:
    """One uint8 buffer holding a whole model on ``device``; a clear error when it does not fit."""
    if device.type == "cpu":
        # Over-allocate so the usable part starts on a DIRECT_ALIGN boundary (O_DIRECT reads land in it).
        raw = torch.empty(nbytes + DIRECT_ALIGN, dtype=torch.uint8)
        shift = (-raw.data_ptr()) % DIRECT_ALIGN
        return raw[shift : shift + nbytes]
    try:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    except torch.OutOfMemoryError as exc:
        free, total = torch.cuda.mem_get_info(device)
        raise DeviceError(
            f"not enough memory on {device}: the model needs {nbytes / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB of {total / 1e9:.2f} GB are free",
            hint="free GPU memory (stop other processes using it) or load on another device",
        ) from exc


class PinnedBuffer:
    """Page-locked host memory for staging, page-aligned (so O_DIRECT can read into it), pinned in
    pieces of ``piece`` bytes; a copy from it must stay within one piece.

    Anonymous pages registered with cudaHostRegister: measured on the H100 machine, torch's
    ``pin_memory=True`` (cudaHostAlloc) pins ~1 GB/s (0.27 s for 256 MiB), registering populated pages
    is tens of GB/s.

    Nothing is faulted in, pinned or wrapped in a tensor up front: :meth:`pin` does it for one piece
    (:meth:`prepare` also returns the piece's tensor), so the threads that first use the pieces do it
    in parallel, each while the others already read. Done up front, a 256 MiB ring took 31-41 ms to
    fault in and 5-7 ms to pin in a fresh process on the H100 machine, all before the first read; and
    after a cache drop, the process's first ``torch.frombuffer`` and slicing took 30-50 ms of torch
    code read back from disk (``benches/probes/ringsteps.py``).
    """

    def __init__(self, nbytes: int, piece: int) -> None:
        self.piece = piece
        self.mapping = Mapping(None, nbytes, huge=True, populate=False)
        self._pinned: set[int] = set()
        self._lock = threading.Lock()
        self.address = self.mapping.address

    def prepare(self, offset: int) -> torch.Tensor:
        """Fault in and pin the piece that starts at ``offset``, unless done already, and return it as a
        tensor. The caller must be the piece's only user while this runs (a staging slot it holds)."""
        address, n = self.pin(offset)
        return host_view(address, n)

    def pin(self, offset: int) -> tuple[int, int]:
        """Fault in and pin the piece that starts at ``offset``, unless done already; its address and
        length. The caller must be the piece's only user while this runs."""
        address = self.mapping.address + offset
        n = min(self.piece, self.mapping.length - offset)
        with self._lock:
            done = address in self._pinned
        if not done:
            self.mapping.advise(MADV_POPULATE_WRITE, offset, n)  # may be refused: the pin faults them in
            host_register(address, n)
            with self._lock:
                self._pinned.add(address)
        return address, n

    def adopt(self, offset: int) -> None:
        """The piece at ``offset`` was pinned elsewhere (by the C read loop, with cudaHostRegister):
        unpin it with the others when the buffer goes."""
        with self._lock:
            self._pinned.add(self.mapping.address + offset)

    def __del__(self) -> None:
        if getattr(self, "mapping", None) is not None and self.mapping.address:
            for address in self._pinned:
                host_unregister(address)
            self.mapping.close()


def host_view(address: int, nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor over raw host memory we own elsewhere (an mmap); it does not copy."""
    return torch.frombuffer(buffer_at(address, nbytes), dtype=torch.uint8)


_register_flags: int | None = None  # the flags that worked on this driver, learned at first use


class _Runtime:
    """cudaHostRegister / cudaHostUnregister / cudaGetLastError of the CUDA runtime torch loaded.

    Called through ctypes, which releases the GIL for the call's duration: pinning 1 GiB takes ~25 ms,
    and torch's own binding holds the GIL meanwhile, stalling every reader thread (measured: warm loads
    that pin and memcpy at once ran slower than either alone). Falls back to torch's binding.
    """

    def __init__(self) -> None:
        self.lib: Any = None
        self.memcpy_async: Any = None
        torch.cuda.init()  # make sure torch's runtime is loaded, so the soname below finds that one
        for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"):
            try:
                lib = ctypes.CDLL(name)
            except OSError:
                continue
            lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
            lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
            lib.cudaStreamCreateWithFlags.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
            lib.cudaEventCreateWithFlags.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
            lib.cudaSetDevice.argtypes = [ctypes.c_int]
            # The copy keeps the GIL (a PyDLL handle): from pinned memory it only queues work and
            # returns in microseconds, and a call that let go of the GIL would wait to take it back
            # behind whichever thread holds it (the views thread, in a first load).
            copy = ctypes.PyDLL(name).cudaMemcpyAsync
            copy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
            self.memcpy_async = copy
            self.lib = lib
            break

    def register(self, address: int, nbytes: int, flags: int) -> int:
        if self.lib is not None:
            return int(self.lib.cudaHostRegister(address, nbytes, flags))
        return int(torch.cuda.cudart().cudaHostRegister(address, nbytes, flags))

    def unregister(self, address: int) -> int:
        if self.lib is not None:
            return int(self.lib.cudaHostUnregister(address))
        return int(torch.cuda.cudart().cudaHostUnregister(address))

    def _create(self, name: str, flags: int) -> int | None:
        """A handle from the runtime's ``name(&handle, flags)`` (a stream, an event); None where the
        runtime cannot be called directly or refused."""
        if self.lib is None:
            return None
        handle = ctypes.c_void_p()
        if getattr(self.lib, name)(ctypes.byref(handle), flags) != 0:
            self.clear_last_error()
            return None
        return handle.value

    def create_stream(self) -> int | None:
        """A new non-blocking stream on the current device (never destroyed); None where it failed."""
        return self._create("cudaStreamCreateWithFlags", _NON_BLOCKING)

    def entry_points(self) -> dict[str, int] | None:
        """The addresses of the runtime calls a native loop makes without Python
        (:mod:`flashtensors.engine.native`); None where the runtime cannot be called directly."""
        if self.lib is None:
            return None
        return {n: int(ctypes.cast(getattr(self.lib, n), ctypes.c_void_p).value or 0) for n in ENTRY_POINTS}

    def create_event(self) -> int | None:
        """A new event without timing on this thread's current device (never destroyed: they are
        kept for later loads, :mod:`flashtensors.engine.events`); None where it failed."""
        return self._create("cudaEventCreateWithFlags", _DISABLE_TIMING)

    def set_device(self, index: int) -> bool:
        """Make device ``index`` this thread's current device (cudaSetDevice); False where the runtime
        cannot be called directly or refused."""
        if self.lib is None:
            return False
        if self.lib.cudaSetDevice(index) != 0:
            self.clear_last_error()
            return False
        return True

    def copy_to_device(self, dst: int, src: int, nbytes: int, stream: int) -> bool:
        """Queue a host-to-device copy of ``nbytes`` from pinned ``src`` to ``dst`` on ``stream`` (a
        cudaStream_t); False where the runtime cannot be called directly (then copy with torch)."""
        if self.lib is None:
            return False
        err = int(self.memcpy_async(dst, src, nbytes, _HOST_TO_DEVICE, stream))
        if err != 0:
            self.clear_last_error()
            raise DeviceError(
                f"cudaMemcpyAsync of {nbytes} bytes to the GPU failed with CUDA error {err}",
                hint="check `nvidia-smi` for the GPU's state; a GPU reset or a driver restart may be needed",
            )
        return True

    def clear_last_error(self) -> None:
        """Reset the runtime's last-error slot after a failure we handled, or torch's next launch check
        would report it as its own."""
        if self.lib is not None:
            self.lib.cudaGetLastError()


_runtime: _Runtime | None = None
_runtime_lock = threading.Lock()


def _rt() -> _Runtime:
    global _runtime
    if _runtime is None:
        with _runtime_lock:  # a load's head start (events.py) may ask at the same time as the load
            if _runtime is None:
                _runtime = _Runtime()
    return _runtime


def host_register(address: int, nbytes: int) -> None:
    """Pin existing host pages (an mmap of a file) so the GPU can DMA from them in place.

    Uses the read-only flag where the driver supports it: the mapping is PROT_READ, and a writable pin
    would fail (or force copy-on-write of every page).

    Raises:
        OSError: the driver refused to pin the range.
    """
    global _register_flags
    rt = _rt()
    candidates = [_register_flags] if _register_flags is not None else [_READ_ONLY, _DEFAULT]
    err = 0
    for flags in candidates:
        err = rt.register(address, nbytes, flags)
        if err == 0:
            _register_flags = flags
            return
        rt.clear_last_error()
    raise OSError(f"cudaHostRegister of {nbytes} bytes failed with CUDA error {err}")


def new_stream(device: torch.device) -> torch.cuda.Stream:
    """A stream of our own on ``device``, made with one cudaStreamCreateWithFlags call.

    ``torch.cuda.Stream()`` takes a stream from torch's pool, and the pool's first use in a process
    creates every stream in it (32 per priority): measured 2.7-5 ms on the H100 machine, a tenth of a
    warm 0.6B load. Falls back to torch's pool where the runtime cannot be called directly.
    """
    with torch.cuda.device(device):
        handle = _rt().create_stream()
    if handle is None:
        return torch.cuda.Stream(device=device)
    return torch.cuda.ExternalStream(handle, device=device)


def raw_copies() -> bool:
    """Whether :func:`copy_to_device` can call the CUDA runtime directly (else copies go through torch)."""
    return _rt().lib is not None


def copy_to_device(dst: int, src: int, nbytes: int, stream: torch.cuda.Stream) -> bool:
    """Queue a copy from pinned host memory at ``src`` to device memory at ``dst`` on ``stream``, with one
    cudaMemcpyAsync through ctypes: no tensor over the host memory, no torch dispatch, and the GIL is
    kept for the call, which only queues the copy. In a fresh process after a cache drop, the first
    ``torch.frombuffer`` took 40-50 ms and the first ``copy_`` 31-38 ms on the H100 machine
    (``benches/probes/primeph.py``), all of it holding the GIL that reader threads need between their
    reads.

    Returns:
        False where the runtime cannot be called directly: the caller copies with torch instead.

    Raises:
        DeviceError: the runtime refused the copy.
    """
    return _rt().copy_to_device(dst, src, nbytes, stream.cuda_stream)


def host_unregister(address: int) -> None:
    rt = _rt()
    if rt.unregister(address) != 0:
        rt.clear_last_error()


def runtime() -> _Runtime:
    """The CUDA runtime torch loaded, called through ctypes (:mod:`flashtensors.engine.native` uses it)."""
    return _rt()
