"""The engine against the reference, bit for bit, on CPU: every dtype, odd layouts, shards, dtype casts.

The reference is ``safetensors.torch.load_file`` (merged over shards) and, where the file was built here
byte by byte, the bytes themselves. Comparisons are on the raw bytes, so NaN payloads and -0.0 count.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import dtype_specs, misaligned_specs
from flashtensors.engine.api import iter_tensors, load, load_file, load_state_dict
from helpers.compare import assert_same, checkpoint_files, raw_bytes, reference_load
from helpers.stfile import build, expected_tensors, pack, random_spec, write


def test_load_file_every_dtype(all_dtypes_file: Path) -> None:
    got = load_file(all_dtypes_file, device="cpu")
    assert_same(got, reference_load(all_dtypes_file))
    assert_same(got, expected_tensors(dtype_specs()))


def test_load_file_default_device_and_str_path(all_dtypes_file: Path) -> None:
    assert_same(load_file(str(all_dtypes_file)), reference_load(all_dtypes_file))


def test_load_file_torch_device(all_dtypes_file: Path) -> None:
    assert_same(load_file(all_dtypes_file, device=torch.device("cpu")), reference_load(all_dtypes_file))


def test_misaligned_tensors(misaligned_file: Path) -> None:
    """A 3-byte U8 first: BF16/F32/F64/C64 tensors start on odd file offsets; values must still be right."""
    got = load_file(misaligned_file)
    assert_same(got, reference_load(misaligned_file))
    assert_same(got, expected_tensors(misaligned_specs()))


def test_results_are_plain_contiguous_tensors(misaligned_file: Path) -> None:
    for name, t in load_file(misaligned_file).items():
        assert t.is_contiguous(), name
        assert not t.requires_grad, name
        # A tensor handed out must be usable like any other: arithmetic on a misaligned source works.
        if t.is_floating_point() and t.numel():
            torch.nan_to_num(t.float()).sum()


def test_empty_checkpoint(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.safetensors", pack({}, b""))
    assert load_file(path) == {}
    assert load_state_dict(path) == {}


def test_only_metadata(tmp_path: Path) -> None:
    path = write(tmp_path / "meta.safetensors", pack({"__metadata__": {"format": "pt"}}))
    assert load_file(path) == reference_load(path) == {}


def test_scalars_and_empty_tensors_only(tmp_path: Path) -> None:
    specs = [
        random_spec("s", "F64", (), 1),
        random_spec("e", "BF16", (0, 4), 2),
        random_spec("e2", "U8", (0,), 3),
    ]
    path = write(tmp_path / "tiny.safetensors", build(specs))
    assert_same(load_file(path), expected_tensors(specs))


def test_unicode_names(tmp_path: Path) -> None:
    specs = [random_spec(n, "F16", (3,), i) for i, n in enumerate(["é.权重", "a b", "", "x" * 300])]
    path = write(tmp_path / "names.safetensors", build(specs))
    assert_same(load_file(path), expected_tensors(specs))


def test_many_small_tensors(tmp_path: Path) -> None:
    specs = [random_spec(f"t{i}", ("U8", "BF16", "F32")[i % 3], (i % 7 + 1,), i) for i in range(3000)]
    path = write(tmp_path / "many.safetensors", build(specs))
    assert_same(load_file(path), expected_tensors(specs))


def test_index_dir(index_dir: Path) -> None:
    assert_same(load_state_dict(index_dir, device="cpu"), reference_load(index_dir))


def test_plain_folder_of_shards(plain_shards_dir: Path) -> None:
    assert_same(load_state_dict(plain_shards_dir), reference_load(plain_shards_dir))


def test_list_of_files(index_dir: Path) -> None:
    files = checkpoint_files(index_dir)
    assert len(files) == 4
    assert_same(load_state_dict(files), reference_load(index_dir))
    assert_same(
        load_state_dict([str(f) for f in files[:2]]), {**reference_load(files[0]), **reference_load(files[1])}
    )


def test_single_file_through_load_state_dict(misaligned_file: Path) -> None:
    assert_same(load_state_dict(misaligned_file), reference_load(misaligned_file))
    assert_same(load_state_dict(str(misaligned_file)), reference_load(misaligned_file))


def test_index_wins_over_stray_files(index_dir: Path, tmp_path: Path) -> None:
    """With an index, only the shards it names are loaded (HF repos often ship consolidated.safetensors
    beside the shards: loading both would double memory and clash on names)."""
    root = tmp_path / "ckpt"
    shutil.copytree(index_dir, root)
    clash = random_spec("layers.0.w0", "F32", (2,), 999)  # a name the shards also define
    write(root / "consolidated.safetensors", build([clash, random_spec("stray", "U8", (4,), 998)]))
    assert_same(load_state_dict(root), reference_load(index_dir))


def test_folder_with_one_file(llama_dir: Path) -> None:
    assert_same(load_state_dict(llama_dir), reference_load(llama_dir / "model.safetensors"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtype_conversion(index_dir: Path, dtype: torch.dtype) -> None:
    """Floating-point tensors are cast as ``.to(dtype)`` would; integer tensors keep their dtype."""
    ref = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in reference_load(index_dir).items()}
    assert any(v.dtype == torch.int64 for v in ref.values())
    assert_same(load_state_dict(index_dir, dtype=dtype), ref)


def test_dtype_conversion_every_dtype(all_dtypes_file: Path) -> None:
    ref = {
        k: (v.to(torch.float16) if v.is_floating_point() else v)
        for k, v in reference_load(all_dtypes_file).items()
    }
    assert_same(load_state_dict(all_dtypes_file, dtype=torch.float16), ref)


def test_iter_tensors_same_pairs(index_dir: Path) -> None:
    pairs = list(iter_tensors(index_dir, device="cpu"))
    names = [n for n, _ in pairs]
    assert len(names) == len(set(names)), "a name was yielded twice"
    assert_same(dict(pairs), reference_load(index_dir))


def test_iter_tensors_every_dtype_and_cast(all_dtypes_file: Path) -> None:
    assert_same(dict(iter_tensors(all_dtypes_file)), reference_load(all_dtypes_file))
    ref = {
        k: (v.to(torch.bfloat16) if v.is_floating_point() else v)
        for k, v in reference_load(all_dtypes_file).items()
    }
    assert_same(dict(iter_tensors(all_dtypes_file, dtype=torch.bfloat16)), ref)


def test_iter_tensors_is_lazy(plain_shards_dir: Path) -> None:
    """The first pair comes before the whole checkpoint is materialised, and the rest still match."""
    it = iter_tensors(plain_shards_dir)
    first_name, first = next(it)
    ref = reference_load(plain_shards_dir)
    assert torch.equal(raw_bytes(first), raw_bytes(ref[first_name]))
    rest = dict(it)
    assert_same({first_name: first, **rest}, ref)


def test_load_stats(index_dir: Path) -> None:
    files = checkpoint_files(index_dir)
    result = load(index_dir)
    assert_same(result.tensors, reference_load(index_dir))
    stats = result.stats
    tensor_bytes = sum(t.numel() * t.element_size() for t in result.tensors.values())
    file_bytes = sum(f.stat().st_size for f in files)
    assert tensor_bytes <= stats.nbytes <= file_bytes
    assert stats.seconds > 0
    assert stats.gbps == pytest.approx(stats.nbytes / stats.seconds / 1e9)
    assert {Path(p).resolve() for p in stats.paths} == {f.resolve() for f in files}
    assert set(stats.paths.values()) <= {"direct", "pinned-mmap", "buffered"}
