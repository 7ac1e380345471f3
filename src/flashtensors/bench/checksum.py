"""Check that a loader returned the right bytes: xxh64 of several tensors against the file's own bytes.

The reference is computed from the checkpoint files directly (offsets from the validated header), so it
depends on no loader; each loader's result is hashed after the clock stops and compared with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from flashtensors.format.safetensors import FileHeader

MISSING = "missing"


@dataclass(frozen=True)
class Mismatch:
    """One tensor whose digest differs from the reference."""

    name: str
    expected: str
    got: str

    def __str__(self) -> str:
        return f"{self.name}: expected {self.expected}, got {self.got}"


def pick_names(headers: Sequence[FileHeader]) -> list[str]:
    """The tensors to hash: first, middle and last by name, plus the largest and the last in file order.

    Args:
        headers: the checkpoint's file headers.

    Returns:
        Up to five distinct tensor names, sorted.
    """
    infos = [t for h in headers for t in h.tensors]
    if not infos:
        return []
    by_name = sorted(t.name for t in infos)
    picks = {by_name[0], by_name[len(by_name) // 2], by_name[-1]}
    picks.add(max(infos, key=lambda t: (t.nbytes, t.name)).name)
    picks.add(headers[-1].tensors[-1].name if headers[-1].tensors else by_name[-1])
    return sorted(picks)


def reference_digests(headers: Sequence[FileHeader], names: Sequence[str]) -> dict[str, str]:
    """xxh64 of each named tensor's bytes, read straight from the files."""
    where = {t.name: (h.path, t.start, t.end) for h in headers for t in h.tensors}
    out: dict[str, str] = {}
    for name in names:
        path, start, end = where[name]
        digest = xxhash.xxh64()
        with open(Path(path), "rb") as f:
            f.seek(start)
            left = end - start
            while left:
                block = f.read(min(left, 64 * 1024**2))
                if not block:
                    break
                digest.update(block)
                left -= len(block)
        out[name] = digest.hexdigest()
    return out


def tensor_digest(tensor: Any) -> str:
    """xxh64 of a tensor's bytes (copied to the CPU, in row-major order, native little-endian)."""
    import torch

    flat = tensor.detach().reshape(-1).contiguous().cpu()
    if flat.numel() == 0:
        return xxhash.xxh64(b"").hexdigest()
    return xxhash.xxh64(flat.view(torch.uint8).numpy()).hexdigest()


def digests(state: Mapping[str, Any], names: Sequence[str]) -> dict[str, str]:
    """Digest of each named tensor of a loaded state dict (:data:`MISSING` when absent)."""
    return {name: tensor_digest(state[name]) if name in state else MISSING for name in names}


def compare_checksums(expected: Mapping[str, str], got: Mapping[str, str] | None) -> list[Mismatch]:
    """Every tensor whose digest differs from the reference (empty list: all equal).

    Args:
        expected: name -> digest from :func:`reference_digests`.
        got: name -> digest from a loader's result; ``None`` counts every name as missing.

    Returns:
        The mismatches, in the order of ``expected``.

    Example:
        >>> compare_checksums({"a": "01"}, {"a": "02"})[0].name
        'a'
    """
    got = got or {}
    return [
        Mismatch(name, want, got.get(name, MISSING))
        for name, want in expected.items()
        if got.get(name) != want
    ]
