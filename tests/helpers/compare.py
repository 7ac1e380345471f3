"""Bit-exact state-dict comparison and small OS probes used by the engine tests."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from flashtensors.bench.cache import drop_cache
from flashtensors.engine.sysio import _libc


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as uint8 on CPU, so NaN payloads, -0.0 and padding bits all count."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same(
    got: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], *, device: str = "cpu"
) -> None:
    """Same names, and per tensor the same dtype, shape, device type and bytes."""
    assert set(got) == set(ref), f"names differ: missing {set(ref) - set(got)}, extra {set(got) - set(ref)}"
    want_type = torch.device(device).type
    for name, r in ref.items():
        g = got[name]
        assert isinstance(g, torch.Tensor), f"{name}: not a tensor but {type(g).__name__}"
        assert g.dtype == r.dtype, f"{name}: dtype {g.dtype} != {r.dtype}"
        assert tuple(g.shape) == tuple(r.shape), f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        assert g.device.type == want_type, f"{name}: on {g.device}, expected {want_type}"
        assert torch.equal(raw_bytes(g), raw_bytes(r)), f"{name}: bytes differ"


def clone_all(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


def read_chars() -> int:
    """Bytes this process has read through read-like syscalls so far (/proc/self/io ``rchar``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def cached_fraction(path: str | os.PathLike[str]) -> float | None:
    """Share of a file's pages in the page cache (mincore on a fresh mapping); None if it cannot be told.

    Python's mmap object does not expose its address, so the mapping is made with libc directly (the
    engine's ctypes bindings). The scan itself is independent of the engine's sampled one: it asks
    mincore about every page.
    """
    size = os.path.getsize(path)
    if size == 0:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        return None
    try:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(addr, size, vec) != 0:
            return None
        return sum(b & 1 for b in bytes(vec)) / pages
    finally:
        _libc.munmap(addr, size)


def drop_from_cache(path: str | os.PathLike[str]) -> bool:
    """Ask the kernel to forget a file's clean pages; True if it is then (almost) out of the cache."""
    drop_cache([path], "fadvise")
    frac = cached_fraction(path)
    return frac is not None and frac < 0.05


def checkpoint_files(checkpoint: str | os.PathLike[str]) -> list[Path]:
    """The shard files of a checkpoint folder, the way HF lays them out (index first, else every file)."""
    root = Path(checkpoint)
    if root.is_file():
        return [root]
    index = root / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [root / name for name in sorted(set(weight_map.values()))]
    return sorted(root.glob("*.safetensors"))


def reference_load(checkpoint: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The expected state dict: ``safetensors.torch.load_file`` of every shard, merged."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(checkpoint):
        part = load_file(str(f))
        assert not set(part) & set(out), f"test checkpoint has a name in two shards: {f}"
        out.update(part)
    return out
