"""``flash-manifest.json``: what a stored model holds, written last, so its presence means "complete".

Example (trimmed)::

    {
      "format": 1,
      "name": "Qwen/Qwen3-0.6B",
      "source": {"type": "hub", "id": "Qwen/Qwen3-0.6B", "revision": "main", "commit": "c1899de..."},
      "created": "2025-06-01T12:00:00Z",
      "architecture": "Qwen3ForCausalLM", "model_type": "qwen3", "dtype": "bfloat16",
      "parameters": 596049920, "size": 1503300328,
      "hash_algorithm": "xxh3_128",
      "files": [{"path": "model.safetensors", "size": 1503300328, "hash": "9f0c..."}, ...],
      "tensors": {"model.embed_tokens.weight": "model.safetensors", ...}
    }
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flashtensors.errors import FormatError, StoreError
from flashtensors.format.safetensors import DTYPES, read_header
from flashtensors.store.fsutil import atomic_write_bytes
from flashtensors.store.hashing import HASH_ALGORITHM
from flashtensors.store.layout import MANIFEST_NAME, ModelRef, StoreLayout

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class FileEntry:
    """One stored file: its path in the model folder, size and hash (and the pickle it was made from)."""

    path: str
    size: int
    hash: str
    converted_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["converted_from"] is None:
            del d["converted_from"]
        return d


@dataclass(frozen=True)
class ModelRecord:
    """A model in the store, as ``list_models()`` and ``pull()`` return it."""

    name: str
    path: Path
    size: int
    modified: datetime  # when the model was stored (UTC)
    source: str  # hub id or folder it came from
    revision: str | None
    architecture: str | None
    dtype: str | None
    parameters: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["modified"] = self.modified.strftime("%Y-%m-%dT%H:%M:%SZ")
        return d


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"config.json is not valid JSON: {exc}") from None
    return doc if isinstance(doc, dict) else {}


def build_manifest(
    folder: Path,
    *,
    name: str,
    source: dict[str, Any],
    files: list[FileEntry],
) -> dict[str, Any]:
    """Describe a finished model folder; validates every safetensors header on the way.

    Args:
        folder: the model folder (in ``.tmp``, before it is renamed into place).
        name: the store name (``org/name``).
        source: ``{"type", "id", "revision", "commit"}``.
        files: every stored file with its size and hash.

    Returns:
        The manifest as a JSON-ready dict.

    Raises:
        FormatError: a safetensors file is invalid, two files hold the same tensor, or an index names a
            file that is not there.
    """
    tensors: dict[str, str] = {}
    parameters = 0
    bytes_by_dtype: dict[str, int] = {}
    for entry in sorted(files, key=lambda e: e.path):
        if not entry.path.endswith(".safetensors"):
            continue
        header = read_header(folder / entry.path)
        for t in header.tensors:
            if t.name in tensors:
                raise FormatError(f"tensor {t.name!r} is in both {tensors[t.name]} and {entry.path}")
            tensors[t.name] = entry.path
            parameters += t.numel
            bytes_by_dtype[t.dtype] = bytes_by_dtype.get(t.dtype, 0) + t.nbytes
    if not any(e.path.endswith(".safetensors") for e in files):
        raise FormatError("the model has no safetensors file")

    stored = {e.path for e in files}
    for index in (p for p in stored if p.endswith(".safetensors.index.json")):
        try:
            weight_map = json.loads((folder / index).read_text(encoding="utf-8")).get("weight_map", {})
        except (ValueError, AttributeError) as exc:
            raise FormatError(f"{index} is not a valid index: {exc}") from None
        missing = sorted(set(weight_map.values()) - stored)
        if missing:
            raise FormatError(f"{index} names file(s) that are not stored: {', '.join(missing)}")

    config = _read_config(folder)
    architectures = config.get("architectures")
    dtype = config.get("dtype") or config.get("torch_dtype")
    if not isinstance(dtype, str) and bytes_by_dtype:
        dtype = DTYPES[max(bytes_by_dtype, key=lambda d: bytes_by_dtype[d])][1]
    return {
        "format": MANIFEST_FORMAT,
        "name": name,
        "source": source,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "architecture": architectures[0] if isinstance(architectures, list) and architectures else None,
        "model_type": config.get("model_type") if isinstance(config.get("model_type"), str) else None,
        "dtype": dtype if isinstance(dtype, str) else None,
        "parameters": parameters,
        "size": sum(e.size for e in files),
        "hash_algorithm": HASH_ALGORITHM,
        "files": [e.to_dict() for e in sorted(files, key=lambda e: e.path)],
        "tensors": tensors,
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest atomically (temp + fsync + rename); it must be the last file written."""
    path = folder / MANIFEST_NAME
    atomic_write_bytes(path, (json.dumps(manifest, indent=2) + "\n").encode())
    return path


def read_manifest(path: Path) -> dict[str, Any]:
    """Load a manifest.

    Raises:
        StoreError: the file is missing or not a manifest we can read.
    """
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise StoreError(
            f"{path}: the manifest is damaged ({exc})",
            hint="remove the model with `flash rm MODEL` and pull it again",
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), list):
        raise StoreError(f"{path}: not a flashtensors manifest", hint="run `flash pull MODEL --force`")
    return doc


def record_from_manifest(layout: StoreLayout, ref: ModelRef, manifest: dict[str, Any]) -> ModelRecord:
    """The :class:`ModelRecord` of a stored model."""
    source = manifest.get("source") or {}
    try:
        modified = datetime.strptime(str(manifest.get("created")), "%Y-%m-%dT%H:%M:%SZ")
        modified = modified.replace(tzinfo=timezone.utc)
    except ValueError:
        modified = datetime.fromtimestamp(layout.manifest_path(ref).stat().st_mtime, timezone.utc)
    return ModelRecord(
        name=ref.id,
        path=layout.model_dir(ref),
        size=int(manifest.get("size") or 0),
        modified=modified,
        source=str(source.get("id") or ""),
        revision=source.get("commit") or source.get("revision"),
        architecture=manifest.get("architecture"),
        dtype=manifest.get("dtype"),
        parameters=int(manifest.get("parameters") or 0),
    )
