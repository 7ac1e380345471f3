"""read_header on valid files: edge cases parse, and what it reports matches the bytes and the reference."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from flashtensors.format.safetensors import DTYPES, MAX_HEADER_SIZE, read_header
from helpers.stfile import TORCH_DTYPES, Spec, build, entry, pack, random_spec, write


def _check_against_bytes(path: Path, specs: list[Spec]) -> None:
    """Every TensorInfo points at exactly the bytes written for that tensor."""
    header = read_header(path)
    blob = path.read_bytes()
    by_name = {t.name: t for t in header.tensors}
    assert set(by_name) == {s.name for s in specs}
    for s in specs:
        t = by_name[s.name]
        assert t.dtype == s.dtype and t.shape == s.shape
        assert blob[t.start : t.end] == s.data, s.name
        assert t.nbytes == len(s.data) == t.numel * t.itemsize
    assert header.file_size == len(blob)
    (n,) = struct.unpack("<Q", blob[:8])
    assert header.data_start == 8 + n


def test_empty_header(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.safetensors", pack({}, b"", pad_to=1))
    header = read_header(path)
    assert len(header) == 0 and header.tensors == () and header.metadata == {}
    assert header.data_size == 0 and header.file_size == 10


def test_empty_header_padded(tmp_path: Path) -> None:
    path = write(tmp_path / "empty8.safetensors", pack({}, b""))
    assert read_header(path).data_start == 16


def test_header_padded_with_many_spaces(tmp_path: Path) -> None:
    specs = [random_spec("x", "F32", (3,), 1)]
    blob = build(specs)
    (n,) = struct.unpack("<Q", blob[:8])
    padded = struct.pack("<Q", n + 4096) + blob[8 : 8 + n] + b" " * 4096 + blob[8 + n :]
    path = write(tmp_path / "padded.safetensors", padded)
    _check_against_bytes(path, specs)


def test_only_metadata(tmp_path: Path) -> None:
    path = write(tmp_path / "meta.safetensors", pack({"__metadata__": {"format": "pt", "é": "ü"}}))
    header = read_header(path)
    assert header.tensors == () and header.metadata == {"format": "pt", "é": "ü"}


def test_scalars_and_empty_tensors(tmp_path: Path) -> None:
    specs = [
        random_spec("scalar", "F32", (), 1),
        random_spec("empty0", "BF16", (0,), 2),
        random_spec("empty_mid", "I64", (3, 0, 7), 3),
        random_spec("w", "F16", (2, 2), 4),
        random_spec("empty_last", "U8", (0,), 5),
    ]
    path = write(tmp_path / "edge.safetensors", build(specs))
    _check_against_bytes(path, specs)


def test_empty_tensors_sharing_one_offset(tmp_path: Path) -> None:
    header = {"e1": entry("F32", [0], 4, 4), "e2": entry("I8", [0, 3], 4, 4), "x": entry("F32", [1], 0, 4)}
    path = write(tmp_path / "shared_empty.safetensors", pack(header, b"\x01\x02\x03\x04"))
    parsed = read_header(path)
    assert {t.name for t in parsed.tensors} == {"e1", "e2", "x"}


def test_tensors_returned_in_file_order(tmp_path: Path) -> None:
    """JSON order (z, a, m) differs from file order (a, m, z): tensors come sorted by offset."""
    header = {"z": entry("U8", [1], 2, 3), "a": entry("U8", [1], 0, 1), "m": entry("U8", [1], 1, 2)}
    path = write(tmp_path / "order.safetensors", pack(header, b"abc"))
    parsed = read_header(path)
    assert [t.name for t in parsed.tensors] == ["a", "m", "z"]
    starts = [t.start for t in parsed.tensors]
    assert starts == sorted(starts) and starts[0] == parsed.data_start


def test_unicode_and_odd_names(tmp_path: Path) -> None:
    specs = [
        random_spec(name, "U8", (2,), i) for i, name in enumerate(["", "é.权重", "a b", '"q"', "x" * 500])
    ]
    path = write(tmp_path / "names.safetensors", build(specs))
    _check_against_bytes(path, specs)


def test_misaligned_layout(misaligned_file: Path) -> None:
    from conftest import misaligned_specs

    _check_against_bytes(misaligned_file, misaligned_specs())


def test_path_types(tmp_path: Path) -> None:
    path = write(tmp_path / "p.safetensors", build([random_spec("x", "U8", (1,), 0)]))
    assert read_header(str(path)).tensors == read_header(path).tensors


def test_dtype_table_matches_torch() -> None:
    """The package's DTYPES agrees with an independently written table and with torch itself."""
    assert set(DTYPES) == set(TORCH_DTYPES)
    for name, (bits, attr) in DTYPES.items():
        size, dt = TORCH_DTYPES[name]
        assert bits == 8 * size, name
        assert getattr(torch, attr) is dt, name
        assert torch.empty((), dtype=dt).element_size() == size, name
    assert MAX_HEADER_SIZE == 100_000_000


def test_every_dtype_matches_reference(all_dtypes_file: Path) -> None:
    """Names, dtypes, shapes and offsets agree with safetensors' own view of a file it wrote."""
    from safetensors import safe_open

    header = read_header(all_dtypes_file)
    blob = all_dtypes_file.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    raw = json.loads(blob[8 : 8 + n])
    assert header.metadata == raw.pop("__metadata__")
    with safe_open(str(all_dtypes_file), framework="pt") as f:
        assert {t.name for t in header.tensors} == set(f.keys())
        for t in header.tensors:
            ref = f.get_tensor(t.name)
            assert getattr(torch, DTYPES[t.dtype][1]) == ref.dtype, t.name
            assert t.shape == tuple(ref.shape), t.name
            assert [t.start - 8 - n, t.end - 8 - n] == raw[t.name]["data_offsets"], t.name
            want = ref.reshape(-1).view(torch.uint8).numpy().tobytes() if ref.numel() else b""
            assert blob[t.start : t.end] == want, t.name


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_each_dtype_alone(tmp_path: Path, dtype: str) -> None:
    specs = [random_spec("t", dtype, (2, 3), 7), random_spec("s", dtype, (), 8)]
    path = write(tmp_path / f"{dtype}.safetensors", build(specs))
    _check_against_bytes(path, specs)
