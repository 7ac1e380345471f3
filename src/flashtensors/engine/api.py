"""The engine's public entry points: load_file, load_state_dict, iter_tensors, load.

plan (headers -> arena layout) -> read (a path per file) -> place (tensors as views into the arena).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flashtensors.config import Settings, get_settings
from flashtensors.engine import devices, events, native, pinned, pinned_mmap, readers, ring_feeder
from flashtensors.engine.plan import GPU_TENSOR_ALIGN, Checkpoint, FileRegion, Plan, make_plan, resolve_files
from flashtensors.engine.sysio import residency
from flashtensors.errors import ConfigError
from flashtensors.format.safetensors import DTYPES, read_header

_TORCH_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, (_, attr) in DTYPES.items() if hasattr(torch, attr)
}


@dataclass
class LoadStats:
    """What a load did: bytes moved, wall time, and the read path each file took."""

    nbytes: int = 0
    seconds: float = 0.0
    device: str = "cpu"
    paths: dict[str, str] = field(default_factory=dict)
    # When the file reads ran, in seconds after the load began: (first read's start, last read's end).
    # None when no file was read with read() (the pinned paths DMA from pinned memory).
    reads: tuple[float, float] | None = None

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass
class LoadResult:
    tensors: dict[str, torch.Tensor]
    stats: LoadStats


def _choose(
    region: FileRegion, device: torch.device, forced: str, settings: Settings, pin_cache: bool = True
) -> str:
    if forced != "auto":
        if forced == "pinned-mmap" and device.type == "cpu":
            return "buffered"  # pinning only helps DMA; for a CPU destination it is a memcpy either way
        return forced
    warm = residency(region.path, region.file_start, region.file_end) >= settings.resident_fraction
    if not warm:
        return "direct"
    return "pinned-mmap" if device.type == "cuda" and pin_cache else "buffered"


def _once(fn: Callable[[], None] | None) -> Callable[[], None] | None:
    """``fn`` made to run at most once (a load may take both the pinned and the pinned-mmap path)."""
    if fn is None:
        return None
    lock = threading.Lock()
    ran = False

    def run() -> None:
        nonlocal ran
        with lock:
            if not ran:
                ran = True
                fn()

    return run


def _read(
    plan: Plan,
    arena: torch.Tensor,
    device: torch.device,
    forced: str,
    settings: Settings,
    while_copying: Callable[[], None] | None = None,
    pin_cache: bool = True,
    window: readers.ReadWindow | None = None,
) -> dict[str, str]:
    chosen: dict[str, list[FileRegion]] = {}
    held: list[pinned.PinnedFile] = []  # files of the RAM tier this load reads, held until it is done
    once = _once(while_copying)
    try:
        for region in plan.regions:
            entry = None
            if device.type == "cuda" and forced in ("auto", "pinned-mmap"):
                entry = pinned.acquire(region.path)
            if entry is not None:
                held.append(entry)
                chosen.setdefault("pinned", []).append(region)
            else:
                chosen.setdefault(_choose(region, device, forced, settings, pin_cache), []).append(region)
        used: dict[str, str] = {}
        for path, regions in chosen.items():
            if device.type == "cpu":
                modes = readers.read_into_host(regions, arena, settings, path == "direct", window)
            elif path == "pinned":
                readers.read_pinned(regions, arena, held, once)
                modes = ["pinned"] * len(regions)
            elif path == "pinned-mmap":
                modes = pinned_mmap.read_pinned_mmap(regions, arena, settings, once)
            else:
                modes = ring_feeder.read_through_ring(
                    regions, arena, settings, path == "direct", window, once
                )
            used.update({str(r.path): m for r, m in zip(regions, modes, strict=True)})
        return used
    finally:
        pinned.release(held)


def _views(plan: Plan, arena: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor as a view into the arena (no data is touched: this may run while copies fly)."""
    out: dict[str, torch.Tensor] = {}
    for p in plan.placements:
        info = p.info
        dtype = _TORCH_DTYPES.get(info.dtype)
        if dtype is None:
            raise ConfigError(f"this torch ({torch.__version__}) has no dtype for {info.dtype} ({info.name})")
        if info.nbytes == 0:
            out[info.name] = torch.empty(info.shape, dtype=dtype, device=arena.device)
            continue
        out[info.name] = arena[p.offset : p.offset + info.nbytes].view(dtype).view(info.shape)
    return out


_views_warmed: set[torch.device] = set()


def warm_views(base: torch.Tensor | None = None) -> None:
    """Take, once per device, every torch code path :func:`_views` takes: a few views of each dtype
    over ``base`` (a uint8 tensor, say a load's arena before its reads) or over 64 bytes of CPU memory.

    Run at import for the CPU, and by a load on a device before its reads. After a cache drop, torch's
    code that no process has mapped is read back from disk on its first use: measured on the CPU
    machine (``benches/probes/viewfaults.py``), a 0.6B checkpoint's 310 views took 53-64 ms and 12-14
    major faults the first time, 2.5-5.7 ms and none once this ran first. Inside a cold load those faults
    wait behind the load's own reads, holding the GIL. The pages then stay mapped in this process, and
    a cache drop leaves mapped pages alone.
    """
    scratch = torch.empty(64, dtype=torch.uint8) if base is None else base
    if scratch.device in _views_warmed or scratch.numel() < 16:
        return
    for dtype in dict.fromkeys(_TORCH_DTYPES.values()):
        try:
            scratch[0 : 2 * dtype.itemsize].view(dtype).view((2, 1))
        except RuntimeError:  # a dtype this build cannot view on this device: a load of it says so
            continue
    _views_warmed.add(scratch.device)


def _relocate(plan: Plan, arena: torch.Tensor) -> None:
    """Move tensors misaligned in their file to their aligned slots (after the read)."""
    for p in plan.placements:
        if p.offset != p.source and p.info.nbytes:
            arena[p.offset : p.offset + p.info.nbytes].copy_(arena[p.source : p.source + p.info.nbytes])


def load(
    checkpoint: Checkpoint,
    *,
    device: str | int | torch.device | None = "cpu",
    dtype: torch.dtype | None = None,
    read_path: str | None = None,
    pin_cache: bool = True,
) -> LoadResult:
    """Load every tensor of a checkpoint onto one device, with timing and the read paths used.

    Args:
        checkpoint: a safetensors file, a folder (``model.safetensors.index.json`` or every
            ``*.safetensors``), a list of files, or a model id of the local store.
        device: "cpu", "cuda", "cuda:N", an index or a torch.device.
        dtype: convert floating-point tensors to this dtype after loading (others are kept).
        read_path: force "direct", "pinned-mmap" or "buffered" (default: ``settings.read_path``, "auto",
            which picks per file from page-cache residency).
        pin_cache: with "auto", a GPU load of files already in the page cache pins the cache in place
            and copies from it (the fastest way to resident tensors). The pages are unpinned afterwards
            on a background thread, and that unpinning holds the driver's lock, delaying the next GPU
            work (~0.1 s per 16 GB on the H100 machine). False reads cached files through the staging
            ring instead, which leaves nothing to undo: for callers that use the GPU at once
            (``load_model``).

    Returns:
        :class:`LoadResult` with ``tensors`` (name -> tensor) and ``stats``.

    Raises:
        FormatError: a file is not valid safetensors (checked before any data is read).
        ModelNotFound: the checkpoint does not exist.
        DeviceError: the device is unusable or has too little memory.
    """
    settings = get_settings()
    forced = read_path or settings.read_path
    if forced not in ("auto", "direct", "pinned-mmap", "buffered"):
        raise ConfigError(f"read_path must be auto, direct, pinned-mmap or buffered, not {forced!r}")
    dev = devices.resolve_device(device)
    start = time.perf_counter()
    if dev.type == "cuda" and forced in ("auto", "direct") and native.takes_cold_loads(settings):
        # The readers' events, made on a thread while this one plans and loads the C loop's library
        # (the process's first event costs 10-18 ms; made once per process, see events.py)
        index = torch.cuda.current_device() if dev.index is None else dev.index
        events.head_start(index, settings.io_threads)
    plan = make_plan(resolve_files(checkpoint), GPU_TENSOR_ALIGN if dev.type == "cuda" else 0)
    arena = devices.allocate_arena(plan.arena_size, dev)
    warm_views(arena)  # a device's first load: its view paths' code paged in before the disk is busy
    tensors: dict[str, torch.Tensor] = {}
    window = readers.ReadWindow()

    def views() -> None:
        tensors.update(_views(plan, arena))

    paths = _read(plan, arena, dev, forced, settings, views, pin_cache, window)
    if not tensors:  # no pinned copy to overlap the views with
        tensors = _views(plan, arena)
    _relocate(plan, arena)
    if dtype is not None:
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    reads = None
    if window.first is not None and window.last is not None:
        reads = (window.first - start, window.last - start)
    return LoadResult(tensors, LoadStats(plan.file_bytes, seconds, str(dev), paths, reads))


def load_state_dict(
    checkpoint: Checkpoint,
    *,
    device: str | int | torch.device | None = "cpu",
    dtype: torch.dtype | None = None,
    read_path: str | None = None,
) -> dict[str, torch.Tensor]:
    """Load a whole (sharded) checkpoint; see :func:`load` for the arguments.

    Example:
        >>> sd = ft.load_state_dict("path/to/Qwen3-8B", device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
    """
    return load(checkpoint, device=device, dtype=dtype, read_path=read_path).tensors


def load_file(filename: str | os.PathLike[str], device: str | int = "cpu") -> dict[str, torch.Tensor]:
    """Drop-in for ``safetensors.torch.load_file``: same arguments, same result.

    Example:
        >>> sd = ft.load_file("model.safetensors", device="cuda:0")  # doctest: +SKIP
    """
    if not Path(filename).is_file():
        raise FileNotFoundError(f"No such file: {filename}")
    return load([filename], device=device).tensors


def iter_tensors(
    checkpoint: Checkpoint,
    *,
    device: str | int | torch.device | None = "cpu",
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` pairs, one file at a time (at most one file's arena alive at once
    beyond what the caller keeps).

    Example:
        >>> for name, t in ft.iter_tensors("path/to/model", device="cuda"):  # doctest: +SKIP
        ...     params[name].copy_(t)
    """
    files = resolve_files(checkpoint)
    for f in files:  # every header is validated before the first byte of data is read
        read_header(f)
    for f in files:
        yield from load([f], device=device, dtype=dtype).tensors.items()


warm_views()  # the views' torch code is paged in at import, while the disk is idle
