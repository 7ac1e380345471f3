"""safetensors headers: parse and validate before a single data byte is read.

The format (https://github.com/huggingface/safetensors, "Format"):

* 8 bytes: N, an unsigned little-endian 64-bit integer, the size of the header.
* N bytes: a UTF-8 JSON object. Each key other than ``__metadata__`` names a tensor and maps to
  ``{"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]}``; offsets are relative to the
  byte buffer that starts right after the header. ``__metadata__``, if present, maps strings to strings.
  The header may be padded with trailing spaces.
* The rest of the file: the byte buffer.

What we enforce (each violation is a :class:`FormatError` naming the file and the problem):

* the file holds at least 8 bytes and N is at most :data:`MAX_HEADER_SIZE` and at most the file size - 8;
* the header is valid UTF-8 JSON, an object, with no duplicate keys, starting with ``{``;
* each entry has exactly the three fields, a known dtype, a shape of non-negative integers and two
  non-negative integer offsets with begin <= end;
* end - begin equals numel x bits / 8 (computed in arbitrary precision: no overflow), and is a whole
  number of bytes;
* tensors, sorted by offset, tile the byte buffer exactly: no overlap, no hole, and the last one ends at
  the end of the file (safetensors itself rejects the same files);
* metadata values are strings.

Nothing here allocates more than the header's size, and the header is read only after its size is checked
against the file's.
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashtensors.errors import FormatError
from flashtensors.lru import LRU

MAX_HEADER_SIZE = 100_000_000  # the same bound safetensors uses
_MAX_DIM = 2**63 - 1

# dtype name in the header -> (bits per element, torch dtype attribute name).
DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (8, "bool"),
    "U8": (8, "uint8"),
    "I8": (8, "int8"),
    "F8_E5M2": (8, "float8_e5m2"),
    "F8_E4M3": (8, "float8_e4m3fn"),
    "F8_E4M3FNUZ": (8, "float8_e4m3fnuz"),
    "F8_E5M2FNUZ": (8, "float8_e5m2fnuz"),
    "F8_E8M0": (8, "float8_e8m0fnu"),
    "I16": (16, "int16"),
    "U16": (16, "uint16"),
    "F16": (16, "float16"),
    "BF16": (16, "bfloat16"),
    "I32": (32, "int32"),
    "U32": (32, "uint32"),
    "F32": (32, "float32"),
    "C64": (64, "complex64"),
    "F64": (64, "float64"),
    "I64": (64, "int64"),
    "U64": (64, "uint64"),
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a file: where its bytes are (absolute file offsets) and how to view them."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int  # absolute, exclusive

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][0] // 8

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class FileHeader:
    """A validated safetensors header."""

    path: Path
    file_size: int
    data_start: int  # 8 + N: where the byte buffer starts in the file
    tensors: tuple[TensorInfo, ...]  # in file order
    metadata: dict[str, str]

    @property
    def data_size(self) -> int:
        return self.file_size - self.data_start

    def __len__(self) -> int:
        return len(self.tensors)


def _fail(path: Path | str, problem: str) -> FormatError:
    return FormatError(f"{path}: not a valid safetensors file: {problem}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_text(value: Any) -> bool:
    """A str that is real Unicode: JSON escapes can smuggle in lone surrogates that no file name,
    dict key or UTF-8 writer downstream can handle (safetensors itself rejects them)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_header_bytes(path: Path | str, raw: bytes, file_size: int) -> FileHeader:
    """Validate a header already read (``raw`` = the N header bytes) against a file of ``file_size``."""
    path = Path(path)
    data_start = 8 + len(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(path, f"header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.startswith("{"):
        raise _fail(path, "header does not start with '{'")
    try:
        obj = json.loads(text.rstrip(" "), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise _fail(path, f"header is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise _fail(path, "header is not a JSON object")

    metadata: dict[str, str] = {}
    if "__metadata__" in obj:
        meta = obj.pop("__metadata__")
        if not isinstance(meta, dict):
            raise _fail(path, "__metadata__ is not an object")
        for key, value in meta.items():
            if not _is_text(key) or not _is_text(value):
                raise _fail(path, f"__metadata__[{key!r}] is not a valid string")
        metadata = meta

    data_size = file_size - data_start
    tensors: list[TensorInfo] = []
    for name, entry in obj.items():
        if not _is_text(name):
            raise _fail(path, f"tensor name {name!r} is not valid Unicode")
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _fail(path, f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise _fail(path, f"tensor {name!r}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise _fail(path, f"tensor {name!r}: shape must be a list of non-negative integers")
        if any(d > _MAX_DIM for d in shape):
            # Even an empty tensor (another dim 0) cannot have such a dim: torch sizes are int64.
            raise _fail(path, f"tensor {name!r}: a dimension of {shape} exceeds {_MAX_DIM}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
            raise _fail(path, f"tensor {name!r}: data_offsets must be two non-negative integers")
        begin, end = offsets
        if begin > end:
            raise _fail(path, f"tensor {name!r}: data_offsets begin {begin} > end {end}")
        if end > data_size:
            raise _fail(
                path, f"tensor {name!r}: data ends at {end}, past the end of the data ({data_size} bytes)"
            )
        numel = 1
        for d in shape:
            numel *= d  # Python ints: no overflow, and the product is bounded below by the check
        bits = DTYPES[dtype][0] * numel
        if bits % 8 or bits // 8 != end - begin:
            raise _fail(
                path,
                f"tensor {name!r}: {dtype}{shape} needs {bits / 8:g} bytes "
                f"but data_offsets span {end - begin}",
            )
        tensors.append(TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end))

    ordered = sorted(tensors, key=lambda t: (t.start, t.end))
    cursor = data_start
    for t in ordered:
        if t.start < cursor:
            raise _fail(path, f"tensor {t.name!r} overlaps the tensor before it")
        if t.start > cursor:
            raise _fail(path, f"hole of {t.start - cursor} bytes before tensor {t.name!r}")
        cursor = t.end
    if cursor != file_size:
        raise _fail(path, f"{file_size - cursor} bytes after the last tensor are not described by the header")
    return FileHeader(path, file_size, data_start, tuple(ordered), metadata)


# Validated headers of files seen before, keyed by what identifies one version of a file. Parsing and
# validating a 300-tensor header takes ~2 ms in Python: most of a hot 0.6B load (~25 ms on the H100).
# A file modified in the last couple of seconds is not cached: file times are kept at clock-tick
# granularity, so a same-size rewrite within one tick would look unchanged (git's "racy clean" problem).
_SETTLED_NS = 2_000_000_000
_headers: LRU[tuple[str, int, int, int, int], FileHeader] = LRU(1024)


def read_header(path: str | os.PathLike[str]) -> FileHeader:
    """Read and validate the header of one safetensors file.

    A file read before and unchanged since (same inode, size and modification time, last modified over
    two seconds before it was read) is not parsed again.

    Args:
        path: the file.

    Returns:
        The validated :class:`FileHeader`; tensors are in file order.

    Raises:
        FormatError: the file is not valid safetensors (the message says why).
        FileNotFoundError: the file does not exist.
    """
    p = Path(path)
    with open(p, "rb") as f:
        st = os.fstat(f.fileno())
        key = (str(p), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        cached = _headers.get(key)
        if cached is not None:
            return cached
        file_size = st.st_size
        head = f.read(8)
        if len(head) < 8:
            raise _fail(p, f"file is {file_size} bytes, too short to hold the 8-byte header size")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_SIZE:
            raise _fail(p, f"header size {n} exceeds the limit of {MAX_HEADER_SIZE} bytes")
        if n > file_size - 8:
            raise _fail(p, f"header size {n} is larger than the rest of the file ({file_size - 8} bytes)")
        if n == 0:
            raise _fail(p, "header is empty")
        raw = f.read(n)
        if len(raw) != n:
            raise _fail(p, "file shrank while its header was read")
    header = parse_header_bytes(p, raw, file_size)
    if time.time_ns() - st.st_mtime_ns < _SETTLED_NS:
        return header
    _headers.put(key, header)
    return header
