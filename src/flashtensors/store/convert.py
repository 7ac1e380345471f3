"""Pickled PyTorch weights (``.bin`` / ``.pt``) to safetensors, at pull time, without running pickled code.

``torch.load(weights_only=True)`` only rebuilds tensors and plain containers; a file that needs anything
else is refused (FormatError) rather than unpickled. Tensors that share memory (tied embeddings) are cloned,
because safetensors stores each tensor's bytes once per name and refuses aliases.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from flashtensors.errors import FormatError
from flashtensors.store.fsutil import fsync_path


def safetensors_name(pickle_name: str) -> str:
    """The safetensors name of a pickle.

    ``pytorch_model-00001-of-00002.bin`` -> ``model-00001-of-00002.safetensors``;
    ``x.pt`` -> ``x.safetensors``.
    """
    stem = re.sub(r"\.(bin|pt|pth)$", "", pickle_name)
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model") :]
    return stem + ".safetensors"


def _state_dict(obj: Any, source: Path) -> dict[str, Any]:
    import torch

    # Training scripts often wrap the weights: {"state_dict": {...}} or {"model": {...}}.
    for _ in range(2):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        if isinstance(obj, dict):
            inner = [obj[k] for k in ("state_dict", "model", "module") if isinstance(obj.get(k), dict)]
            if len(inner) == 1:
                obj = inner[0]
                continue
        break
    raise FormatError(f"{source.name}: not a state dict (a mapping of names to tensors)")


def _detach_aliases(sd: dict[str, Any]) -> dict[str, Any]:
    """Give every tensor its own contiguous storage, cloning those that share one."""
    seen: set[tuple[Any, ...]] = set()
    out: dict[str, Any] = {}
    for name, t in sd.items():
        storage = t.untyped_storage()
        key = (t.device.type, storage.data_ptr(), storage.nbytes())
        if key in seen or not t.is_contiguous() or t.nbytes != storage.nbytes():
            t = t.contiguous().clone()
        else:
            seen.add(key)
        out[name] = t
    return out


def _load(source: Path) -> Any:
    import torch

    try:
        # mmap avoids holding a second copy of a multi-GB shard in RAM while it is rewritten.
        return torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):  # legacy (non-zip) files cannot be mapped; anything else is real
            raise
    return torch.load(source, map_location="cpu", weights_only=True)


def convert_pickle(source: Path, target: Path) -> int:
    """Convert one pickled state dict into a new safetensors file (fsynced).

    Args:
        source: the ``.bin`` / ``.pt`` / ``.pth`` file.
        target: the ``.safetensors`` file to create.

    Returns:
        The number of tensors written.

    Raises:
        FormatError: the file cannot be loaded with ``weights_only=True`` or holds no state dict.
    """
    import pickle

    from safetensors.torch import save_file

    try:
        obj = _load(source)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(
            f"{source.name}: cannot be read as plain weights (weights_only=True): {first_line}",
            hint="convert it to safetensors yourself, or pull a revision that has *.safetensors files",
        ) from None
    sd = _detach_aliases(_state_dict(obj, source))
    save_file(sd, os.fspath(target), metadata={"format": "pt"})
    fsync_path(target)
    return len(sd)


def write_index(folder: Path, files: list[str]) -> Path:
    """Write ``model.safetensors.index.json`` for converted shards (only when there are several)."""
    from flashtensors.format.safetensors import read_header

    weight_map: dict[str, str] = {}
    total = 0
    for name in files:
        header = read_header(folder / name)
        total += header.data_size
        for t in header.tensors:
            weight_map[t.name] = name
    path = folder / "model.safetensors.index.json"
    doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    fsync_path(path)
    return path
