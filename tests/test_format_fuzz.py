"""Fuzz the header parser with a fixed seed: a damaged header is refused or describes the data exactly.

No hypothesis: a seeded loop is reproducible byte for byte and needs no extra dependency. A failure
message carries the iteration number and the mutated bytes, which is enough to rebuild the case.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from flashtensors.errors import FormatError
from flashtensors.format.safetensors import DTYPES, FileHeader, read_header
from helpers.stfile import build, random_spec, write

SEED = 20240917
ROUNDS = 500
# Bytes that keep a JSON header "almost valid" far more often than uniform noise does.
_INTERESTING = b'0123456789{}[]",: -.eE\x00\xff' + b"FUIB"


def _base() -> bytes:
    specs = [
        random_spec("embed", "BF16", (4, 6), 1),
        random_spec("scale", "F32", (), 2),
        random_spec("ids", "I64", (3,), 3),
        random_spec("mask", "BOOL", (5,), 4),
        random_spec("none", "F16", (0, 2), 5),
    ]
    return build(specs, {"format": "pt", "k": "v"})


def _assert_tiles(header: FileHeader) -> None:
    cursor = header.data_start
    for t in header.tensors:  # promised to be in file order
        assert t.dtype in DTYPES
        assert all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in t.shape), t
        assert t.start == cursor, f"{t.name} starts at {t.start}, expected {cursor}"
        assert t.end - t.start == t.numel * t.itemsize, t
        cursor = t.end
    assert cursor == header.file_size
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in header.metadata.items())


def _check(path: Path, blob: bytes, what: str) -> bool:
    """True if the file was refused (cleanly); fails the test on anything else that is wrong."""
    write(path, blob)
    try:
        header = read_header(path)
    except FormatError as exc:
        assert str(path) in exc.message, what
        return True
    except Exception as exc:  # noqa: BLE001 - any other exception is the bug this test hunts
        pytest.fail(f"{what}: {type(exc).__name__}: {exc}")
    _assert_tiles(header)
    _agrees_with_reference(path, header, what)
    return False


def _agrees_with_reference(path: Path, header: FileHeader, what: str) -> None:
    """What we accept, safetensors accepts too, with the same names, dtypes and shapes."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            ref = {k: f.get_slice(k) for k in f.keys()}
            got = {k: (s.get_dtype(), tuple(s.get_shape())) for k, s in ref.items()}
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{what}: we accepted a file safetensors refuses ({exc})")
    assert got == {t.name: (t.dtype, t.shape) for t in header.tensors}, what


def test_mutated_headers(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    base = _base()
    (n,) = struct.unpack("<Q", base[:8])
    path = tmp_path / "fuzz.safetensors"
    refused = 0
    for i in range(ROUNDS):
        blob = bytearray(base)
        changes = []
        for _ in range(rng.randint(1, 4)):
            # Mostly the JSON, sometimes the 8-byte size prefix.
            pos = rng.randrange(0, 8) if rng.random() < 0.1 else rng.randrange(8, 8 + n)
            value = rng.choice(_INTERESTING) if rng.random() < 0.7 else rng.randrange(256)
            changes.append((pos, value))
            blob[pos] = value
        refused += _check(path, bytes(blob), f"round {i}: {changes}")
    # The mutations must mostly break something, or the loop tests nothing.
    assert refused > ROUNDS // 2


def test_mutated_files_through_the_engine(tmp_path: Path) -> None:
    """Fewer rounds, through load_file: refused with a FormatError, or loaded exactly as safetensors does."""
    from flashtensors.engine.api import load_file
    from helpers.compare import assert_same, reference_load

    rng = random.Random(SEED + 1)
    base = _base()
    (n,) = struct.unpack("<Q", base[:8])
    path = tmp_path / "fuzz.safetensors"
    loaded = 0
    for i in range(150):
        blob = bytearray(base)
        pos, value = rng.randrange(8, 8 + n), rng.choice(_INTERESTING)
        blob[pos] = value
        write(path, bytes(blob))
        try:
            got = load_file(path)
        except FormatError:
            continue
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"round {i} ({pos}, {value}): {type(exc).__name__}: {exc}")
        assert_same(got, reference_load(path))
        loaded += 1
    assert loaded > 0  # some mutations (a digit of a shape that keeps the size, a padding byte) survive


def test_truncations(tmp_path: Path) -> None:
    """Every cut of a valid file is refused (only the whole file is valid)."""
    base = _base()
    path = tmp_path / "cut.safetensors"
    for cut in range(len(base)):
        write(path, base[:cut])
        with pytest.raises(FormatError):
            read_header(path)
    write(path, base)
    _assert_tiles(read_header(path))


def test_appended_bytes(tmp_path: Path) -> None:
    base = _base()
    path = tmp_path / "grown.safetensors"
    for extra in (b"\x00", b" ", b"\x00" * 4096):
        write(path, base + extra)
        with pytest.raises(FormatError):
            read_header(path)
