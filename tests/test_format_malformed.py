"""read_header refuses every malformed file with a FormatError that names the file.

Each file of the corpus (tests/helpers/corpus.py) breaks exactly one rule. Besides the error type, the
tests bound the time and the memory the parser spends on it: a parser that trusts a size field would
allocate or read what the field claims.
"""

from __future__ import annotations

import signal
import time
import tracemalloc
from pathlib import Path

import pytest

from flashtensors.errors import FormatError
from flashtensors.format.safetensors import read_header
from helpers.corpus import CASES, Case
from helpers.stfile import write


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Timeout


def _write_case(tmp_path: Path, case: Case) -> Path:
    return write(tmp_path / f"{case.id}.safetensors", case.make())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_file_raises_format_error(tmp_path: Path, case: Case) -> None:
    path = _write_case(tmp_path, case)
    size = path.stat().st_size
    # SIGALRM turns a hang into a failure instead of a stuck suite.
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(10)
    tracemalloc.start()
    started = time.perf_counter()
    error: BaseException | None = None
    try:
        read_header(path)
    except Exception as exc:  # noqa: BLE001 - any exception but FormatError is reported by name below
        error = exc
    finally:
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert error is not None, f"{case.id}: accepted"
    assert type(error) is FormatError, f"{case.id}: {type(error).__name__}: {error}"
    assert str(path) in error.message, f"{case.id}: message does not name the file: {error.message}"
    assert error.hint, "a FormatError must carry a hint"
    assert elapsed < 2.0, f"{case.id}: parser took {elapsed:.2f}s"
    # The header can legitimately cost a few times its size (JSON objects); never what a field claims.
    assert peak < 16 * size + (1 << 20), f"{case.id}: parser allocated {peak} bytes for a {size}-byte file"


# Cases where safetensors accepts what we refuse are left out here; each says why we are stricter.
_REFERENCE_REJECTS = [c for c in CASES if c.safetensors_rejects]


@pytest.mark.parametrize("case", _REFERENCE_REJECTS, ids=[c.id for c in _REFERENCE_REJECTS])
def test_reference_refuses_the_same_file(tmp_path: Path, case: Case) -> None:
    """The corpus is not our own invention: safetensors.torch.load_file refuses each of these too."""
    from safetensors.torch import load_file

    path = _write_case(tmp_path, case)
    with pytest.raises(Exception):  # noqa: B017 - the reference raises SafetensorError or a TypeError
        load_file(str(path))


def test_stricter_cases_say_why() -> None:
    for case in CASES:
        assert case.safetensors_rejects or case.why_stricter, case.id


def test_message_names_a_relative_path_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "rel.safetensors", b"\x00" * 3)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FormatError, match="rel.safetensors"):
        read_header("rel.safetensors")


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_header(tmp_path / "absent.safetensors")


def test_header_size_is_checked_before_reading(tmp_path: Path) -> None:
    """A header that claims 99 MB in a 1 MB file: refused without reading the claimed size."""
    import struct

    path = write(tmp_path / "claims.safetensors", struct.pack("<Q", 99_000_000) + b"{" + b" " * (1 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="larger than the rest of the file"):
            read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
