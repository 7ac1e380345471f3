"""A corpus of malformed safetensors files, each one the smallest file that breaks one rule.

Every case is a valid two-tensor file with one thing wrong, so a parser that rejects it can only be
rejecting for that reason. ``safetensors_rejects`` records what the reference loader does (measured with
safetensors 0.8): where it accepts a file we reject, the case says why we are stricter.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from helpers.stfile import entry, pack

# The base file: a F32[2,3] (24 bytes) then a I64[2] (16 bytes).
DATA = bytes(range(40))


def base_header() -> dict[str, Any]:
    return {"a": entry("F32", [2, 3], 0, 24), "b": entry("I64", [2], 24, 40)}


def valid_base() -> bytes:
    return pack(base_header(), DATA)


def _with(name: str, **fields: Any) -> bytes:
    """The base file with tensor ``name``'s fields replaced (data unchanged)."""
    h = base_header()
    h[name] = {**h[name], **fields}
    return pack(h, DATA)


def _offsets(a: list[Any], b: list[Any], data: bytes = DATA) -> bytes:
    h = base_header()
    h["a"]["data_offsets"] = a
    h["b"]["data_offsets"] = b
    return pack(h, data)


def _raw_header(text: str | bytes, data: bytes = b"") -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw + data


def _deep_nesting() -> bytes:
    depth = 100_000
    return _raw_header('{"a":' + "[" * depth + "]" * depth + "}")


_ENTRY_A = json.dumps(entry("F32", [2, 3], 0, 24))


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], bytes]
    safetensors_rejects: bool = True
    why_stricter: str = ""


CASES: list[Case] = [
    # -- the size prefix and the file's length
    Case("empty_file", lambda: b""),
    Case("five_bytes", lambda: b"\x10\x00\x00\x00\x00"),
    Case("header_cut_short", lambda: valid_base()[: 8 + 20]),
    Case("data_cut_short", lambda: valid_base()[:-4]),
    Case("no_data_at_all", lambda: pack(base_header(), b"")),
    Case("header_size_over_limit", lambda: struct.pack("<Q", 100_000_001) + b"{}" + b" " * 64),
    Case("header_size_u64_max", lambda: struct.pack("<Q", 2**64 - 1) + b"{}      "),
    Case("header_size_past_eof", lambda: pack(base_header(), DATA, size=len(valid_base()))),
    Case("header_size_zero", lambda: struct.pack("<Q", 0) + DATA),
    # -- the JSON text
    Case("not_utf8", lambda: _raw_header(b'{"a\xff\xfe":' + _ENTRY_A.encode() + b"}", DATA[:24])),
    Case("invalid_json", lambda: _raw_header('{"a": {"dtype": "F32",', DATA)),
    Case("json_array", lambda: _raw_header("[1, 2, 3]")),
    Case("json_string", lambda: _raw_header('"abc"')),
    Case("json_number", lambda: _raw_header("12345678")),
    Case(
        "leading_space",
        lambda: _raw_header(" {}"),
        safetensors_rejects=False,
        why_stricter="the format says the header MUST begin with '{'; safetensors 0.8 skips the space",
    ),
    Case("utf8_bom", lambda: _raw_header(b"\xef\xbb\xbf{}")),
    # Python refuses int literals of more than 4300 digits (ValueError inside json): still a FormatError.
    Case(
        "huge_integer_literal",
        lambda: _raw_header('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,' + "9" * 5000 + "]}}"),
    ),
    Case(
        "nan_literal",
        lambda: _raw_header('{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}', DATA[:4]),
    ),
    Case(
        "infinity_literal",
        lambda: _raw_header('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,Infinity]}}'),
    ),
    Case(
        "lone_surrogate_name",
        lambda: _raw_header('{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', DATA[:4]),
    ),
    Case("nul_padding", lambda: _raw_header(b"{}\x00\x00\x00\x00\x00\x00")),
    Case("deep_nesting", _deep_nesting),
    Case(
        "duplicate_keys",
        lambda: _raw_header('{"a":' + _ENTRY_A + ',"a":' + _ENTRY_A + "}", DATA[:24]),
        safetensors_rejects=False,
        why_stricter="safetensors keeps the last of two equal keys; a name meaning two tensors is ambiguous",
    ),
    # -- dtype
    Case("unknown_dtype", lambda: _with("a", dtype="F128")),
    Case("lowercase_dtype", lambda: _with("a", dtype="f32")),
    Case("dtype_not_string", lambda: _with("a", dtype=32)),
    # -- shape
    Case("shape_not_list", lambda: _with("b", shape=2)),
    Case("shape_string", lambda: _with("b", shape="[2]")),
    Case("shape_null", lambda: _with("b", shape=None)),
    Case("shape_negative", lambda: _with("a", shape=[-2, -3])),
    Case("shape_float", lambda: _with("a", shape=[2.0, 3])),
    Case("shape_bool", lambda: _with("b", shape=[True, 2])),
    Case("shape_nested", lambda: _with("b", shape=[[2]])),
    Case("shape_product_overflows_int64", lambda: _with("a", shape=[2**40, 2**40])),
    Case("shape_product_wraps_to_size", lambda: _with("b", shape=[2**62 + 1, 2])),
    Case("shape_dim_over_u64_empty", lambda: _dim_huge(2**64)),
    Case("shape_dim_over_int64_empty", lambda: _dim_huge(2**63)),
    # -- data_offsets
    Case("offsets_one_value", lambda: _with("a", data_offsets=[0])),
    Case("offsets_three_values", lambda: _with("a", data_offsets=[0, 24, 24])),
    Case("offsets_not_list", lambda: _with("a", data_offsets=24)),
    Case("offsets_begin_gt_end", lambda: _offsets([24, 0], [24, 40])),
    Case("offsets_float", lambda: _offsets([0.0, 24.0], [24, 40])),
    Case("offsets_string", lambda: _offsets(["0", "24"], [24, 40])),
    Case("offsets_bool", lambda: _offsets([False, 24], [24, 40])),
    Case("offsets_negative", lambda: _offsets([-24, 0], [24, 40])),
    Case("offsets_huge", lambda: _offsets([0, 24], [2**64, 2**64 + 16])),
    Case("size_mismatch_short", lambda: _offsets([0, 20], [20, 36], DATA[:36])),
    Case("size_mismatch_long", lambda: _offsets([0, 28], [28, 44], DATA + b"\x00" * 4)),
    Case("overlap_same_region", lambda: _same_region()),
    Case("overlap_partial", lambda: _offsets([0, 24], [16, 32], DATA[:32])),
    Case("hole_between_tensors", lambda: _offsets([0, 24], [32, 48], DATA + b"\x00" * 8)),
    Case("hole_before_first", lambda: _offsets([8, 32], [32, 48], DATA + b"\x00" * 8)),
    Case("trailing_bytes", lambda: pack(base_header(), DATA + b"\x00" * 8)),
    Case("offsets_past_eof", lambda: _offsets([0, 24], [24, 40], DATA[:32])),
    # -- metadata and entries
    Case("metadata_int_value", lambda: pack({"__metadata__": {"k": 1}, **base_header()}, DATA)),
    Case("metadata_null_value", lambda: pack({"__metadata__": {"k": None}, **base_header()}, DATA)),
    Case("metadata_list_value", lambda: pack({"__metadata__": {"k": ["v"]}, **base_header()}, DATA)),
    Case(
        "metadata_duplicate_keys",
        lambda: _raw_header('{"__metadata__":{"k":"x","k":"y"},"a":' + _ENTRY_A + "}", DATA[:24]),
        safetensors_rejects=False,
        why_stricter="safetensors keeps the last value; we refuse ambiguous headers anywhere",
    ),
    Case("metadata_string", lambda: pack({"__metadata__": "format=pt", **base_header()}, DATA)),
    Case("metadata_list", lambda: pack({"__metadata__": ["format", "pt"], **base_header()}, DATA)),
    Case(
        "entry_extra_key",
        lambda: _with("a", extra=1),
        safetensors_rejects=False,
        why_stricter="safetensors ignores unknown fields; one may change what the bytes mean",
    ),
    Case("entry_missing_shape", lambda: pack({"a": {"dtype": "F32", "data_offsets": [0, 24]}}, DATA[:24])),
    Case("entry_not_object", lambda: pack({"a": [0, 24]}, DATA[:24])),
    Case("entry_null", lambda: pack({"a": None}, b"")),
]


def _dim_huge(dim: int) -> bytes:
    """An empty tensor whose other dimension no int64 (or u64) can hold: numel is 0, sizes match."""
    h = base_header()
    h["z"] = entry("F32", [dim, 0], 40, 40)
    return pack(h, DATA)


def _same_region() -> bytes:
    h = base_header()
    h["b"] = entry("I64", [3], 0, 24)
    return pack(h, DATA[:24])


BY_ID: dict[str, Case] = {c.id: c for c in CASES}
