"""Build safetensors files byte by byte, valid or deliberately broken.

The reference writer (``safetensors.torch.save_file``) can only produce valid files and chooses its own
tensor order and header padding; the tests need every layout a file on disk could have, so this module
writes the 8-byte size prefix, the JSON and the data itself with ``struct`` and ``json``.
"""

from __future__ import annotations

import json
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# safetensors dtype name -> (bytes per element, torch dtype); written independently of the package's table
# so that a wrong entry there is caught here.
TORCH_DTYPES: dict[str, tuple[int, torch.dtype]] = {
    "BOOL": (1, torch.bool),
    "U8": (1, torch.uint8),
    "I8": (1, torch.int8),
    "F8_E5M2": (1, torch.float8_e5m2),
    "F8_E4M3": (1, torch.float8_e4m3fn),
    "F8_E4M3FNUZ": (1, torch.float8_e4m3fnuz),
    "F8_E5M2FNUZ": (1, torch.float8_e5m2fnuz),
    "F8_E8M0": (1, torch.float8_e8m0fnu),
    "I16": (2, torch.int16),
    "U16": (2, torch.uint16),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "I32": (4, torch.int32),
    "U32": (4, torch.uint32),
    "F32": (4, torch.float32),
    "C64": (8, torch.complex64),
    "F64": (8, torch.float64),
    "I64": (8, torch.int64),
    "U64": (8, torch.uint64),
}


@dataclass(frozen=True)
class Spec:
    """One tensor to write: name, safetensors dtype, shape and its raw little-endian bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes


def numel(shape: tuple[int, ...] | list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def random_spec(name: str, dtype: str, shape: tuple[int, ...], seed: int) -> Spec:
    """A tensor of random bytes (NaN payloads, -0.0 and subnormals included); bools hold 0 or 1."""
    size = numel(shape) * TORCH_DTYPES[dtype][0]
    rng = random.Random(seed)
    raw = rng.randbytes(size)
    if dtype == "BOOL":
        raw = bytes(b & 1 for b in raw)
    return Spec(name, dtype, tuple(shape), raw)


def entry(dtype: str, shape: list[Any], begin: Any, end: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def layout(specs: list[Spec]) -> tuple[dict[str, Any], bytes]:
    """Header dict and data buffer for ``specs`` packed back to back in the given order."""
    header: dict[str, Any] = {}
    data = bytearray()
    for s in specs:
        header[s.name] = entry(s.dtype, list(s.shape), len(data), len(data) + len(s.data))
        data += s.data
    return header, bytes(data)


def encode_header(header: dict[str, Any] | str | bytes, *, pad_to: int = 8) -> bytes:
    """Serialize a header; a str/bytes is used verbatim (duplicate keys, broken JSON), dicts are padded
    with spaces so that the data starts on a multiple of ``pad_to`` (1 = no padding)."""
    if isinstance(header, bytes):
        return header
    if isinstance(header, str):
        return header.encode("utf-8")
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-(8 + len(raw))) % pad_to)
    return raw


def pack(
    header: dict[str, Any] | str | bytes,
    data: bytes = b"",
    *,
    size: int | None = None,
    pad_to: int = 8,
) -> bytes:
    """A whole file: the 8-byte size (``size`` overrides the true one), the header, then ``data``."""
    raw = encode_header(header, pad_to=pad_to)
    n = len(raw) if size is None else size
    return struct.pack("<Q", n) + raw + data


def build(
    specs: list[Spec], metadata: dict[str, str] | None = None, *, data_start_mod8: int | None = None
) -> bytes:
    """A valid file holding ``specs`` in the given order.

    ``data_start_mod8`` pads the header so the byte buffer starts at an offset with that remainder mod 8
    (e.g. 3: every multi-byte tensor is misaligned in the file).
    """
    header, data = layout(specs)
    if metadata is not None:
        header = {"__metadata__": metadata, **header}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if data_start_mod8 is not None:
        raw += b" " * ((data_start_mod8 - 8 - len(raw)) % 8)
    else:
        raw += b" " * ((-(8 + len(raw))) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def write(path: str | os.PathLike[str], blob: bytes) -> Path:
    """Write ``blob`` to ``path``, creating folders (no fsync: cache experiments sync themselves)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(blob)
    return p


def expected_tensors(specs: list[Spec]) -> dict[str, torch.Tensor]:
    """What a correct loader returns for ``specs``, built from the bytes without any loader."""
    out: dict[str, torch.Tensor] = {}
    for s in specs:
        dt = TORCH_DTYPES[s.dtype][1]
        flat = (
            torch.frombuffer(bytearray(s.data), dtype=torch.uint8)
            if s.data
            else torch.empty(0, dtype=torch.uint8)
        )
        out[s.name] = flat.view(dt).reshape(s.shape)
    return out
