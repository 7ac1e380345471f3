"""The engine's failures: bad shards are caught before any data is read, missing things are FlashErrors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from flashtensors.engine.api import iter_tensors, load_file, load_state_dict
from flashtensors.errors import DeviceError, FlashError, FormatError
from flashtensors.format.safetensors import read_header
from helpers.compare import cached_fraction, drop_from_cache, read_chars
from helpers.corpus import BY_ID, CASES, Case
from helpers.stfile import build, random_spec, write

PATHS = ["buffered", "direct", "pinned-mmap", "auto"]
GOOD_SHARD_BYTES = 2 * 1024 * 1024


def _checkpoint_with_bad_shard(root: Path, bad_case: str, with_index: bool) -> tuple[list[Path], Path]:
    """Two 2 MiB good shards around a bad one (the middle shard, so file order does not hide it)."""
    root.mkdir()
    names = [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    good = []
    weight_map = {}
    for i, name in enumerate(names):
        if i == 1:
            write(root / name, BY_ID[bad_case].make())
            weight_map["a"] = name
            continue
        spec = random_spec(f"w{i}", "U8", (GOOD_SHARD_BYTES,), 40 + i)
        good.append(write(root / name, build([spec])))
        weight_map[spec.name] = name
    if with_index:
        (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return good, root / names[1]


@pytest.mark.parametrize("with_index", [True, False], ids=["index", "plain"])
@pytest.mark.parametrize("read_path", PATHS)
def test_bad_shard_fails_before_any_data_read(tmp_path: Path, read_path: str, with_index: bool) -> None:
    good, bad = _checkpoint_with_bad_shard(tmp_path / "ckpt", "trailing_bytes", with_index)
    # What reading the headers alone pulls into the page cache (readahead varies between machines).
    cold = all(drop_from_cache(g) for g in good)
    for g in good:
        read_header(g)
    baseline = [cached_fraction(g) or 0.0 for g in good]
    cold = cold and all(drop_from_cache(g) for g in good)
    read_before = read_chars()
    with pytest.raises(FormatError) as info:
        load_state_dict(tmp_path / "ckpt", read_path=read_path)
    read = read_chars() - read_before
    assert str(bad) in info.value.message
    # Headers are a few hundred bytes; the good shards' data is 4 MiB. Reads through read()/pread()
    # show in rchar, reads through a mapping show in the page cache of a file we made cold.
    assert read < GOOD_SHARD_BYTES // 4, f"{read} bytes read before the error"
    if cold:
        for g, base in zip(good, baseline, strict=True):
            frac = cached_fraction(g)
            assert frac is not None and frac <= base + 0.25, (
                f"{g.name}: {frac:.0%} cached ({base:.0%} by headers)"
            )


@pytest.mark.parametrize("case", ["header_size_past_eof", "shape_negative", "overlap_partial", "not_utf8"])
def test_bad_shard_error_names_it(tmp_path: Path, case: str) -> None:
    _, bad = _checkpoint_with_bad_shard(tmp_path / "ckpt", case, with_index=True)
    with pytest.raises(FormatError, match=bad.name):
        load_state_dict(tmp_path / "ckpt")


def test_iter_tensors_validates_every_header_first(tmp_path: Path) -> None:
    """Nothing is yielded from the first good shard when a later shard is bad."""
    _, bad = _checkpoint_with_bad_shard(tmp_path / "ckpt", "data_cut_short", with_index=True)
    it = iter_tensors(tmp_path / "ckpt")
    with pytest.raises(FormatError, match=bad.name):
        next(it)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_malformed_file_through_the_engine(tmp_path: Path, case: Case) -> None:
    """The whole corpus, through load_file: a FormatError each time, never a torch or OS error."""
    path = write(tmp_path / f"{case.id}.safetensors", case.make())
    try:
        load_file(path)
    except FormatError as exc:
        assert str(path) in exc.message
        return
    except Exception as exc:  # noqa: BLE001 - name whatever else escapes
        pytest.fail(f"{case.id}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    pytest.fail(f"{case.id}: loaded")


def test_load_file_on_bad_file(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.safetensors", BY_ID["size_mismatch_short"].make())
    with pytest.raises(FormatError, match="bad.safetensors"):
        load_file(path)


def test_missing_shard_named_in_index(index_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    shutil.copytree(index_dir, root)
    missing = root / "model-00003-of-00004.safetensors"
    missing.unlink()
    with pytest.raises(FlashError) as info:
        load_state_dict(root)
    assert not isinstance(info.value, FileNotFoundError)
    assert missing.name in info.value.message
    assert info.value.hint


def test_index_that_is_not_json(index_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    shutil.copytree(index_dir, root)
    (root / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(FlashError, match="index"):
        load_state_dict(root)


def test_index_without_weight_map(index_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    shutil.copytree(index_dir, root)
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(FlashError):
        load_state_dict(root)


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FlashError) as info:
        load_state_dict(tmp_path)
    assert str(tmp_path) in info.value.message


def test_unknown_model_id() -> None:
    """A string that is no path goes to the store; an id it does not hold is a FlashError with a hint."""
    with pytest.raises(FlashError) as info:
        load_state_dict("no-such-org/no-such-model")
    assert "no-such-org/no-such-model" in info.value.message
    assert info.value.hint


def test_load_file_on_missing_file(tmp_path: Path) -> None:
    """Like safetensors.torch.load_file: a missing file is a FileNotFoundError."""
    with pytest.raises(FileNotFoundError):
        load_file(tmp_path / "absent.safetensors")


def test_bad_devices(misaligned_file: Path) -> None:
    with pytest.raises(DeviceError):
        load_state_dict(misaligned_file, device="tpu")
    with pytest.raises(DeviceError):
        load_state_dict(misaligned_file, device="not a device")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError):
            load_state_dict(misaligned_file, device="cuda:0")
