"""Tensors handed out own their memory: no aliasing between loads, tensors, staging buffers or the file.

Two engines of the peers returned views into reused staging buffers and corrupted weights silently;
these tests would catch that, and a tensor that is a view into a shared file mapping.
"""

from __future__ import annotations

import gc
import hashlib
import shutil
from pathlib import Path

import pytest
import torch

import flashtensors as ft
from flashtensors.engine.api import load, load_file, load_state_dict
from helpers.compare import assert_same, clone_all, reference_load
from helpers.stfile import build, expected_tensors, random_spec, write

PATHS = ["buffered", "direct", "pinned-mmap", "auto"]


def _scribble(sd: dict[str, torch.Tensor], value: int) -> None:
    for t in sd.values():
        t.reshape(-1).view(torch.uint8).fill_(value)


@pytest.mark.parametrize("read_path", PATHS)
def test_two_loads_are_independent(misaligned_file: Path, read_path: str) -> None:
    first = load_state_dict(misaligned_file, read_path=read_path)
    second = load_state_dict(misaligned_file, read_path=read_path)
    _scribble(first, 0xA5)
    assert_same(second, reference_load(misaligned_file))


@pytest.mark.parametrize("read_path", PATHS)
def test_tensors_of_one_load_do_not_overlap(index_dir: Path, read_path: str) -> None:
    """Writing a distinct byte into each tensor leaves every other tensor's bytes alone."""
    sd = load_state_dict(index_dir, read_path=read_path)
    names = sorted(sd)
    for i, name in enumerate(names):
        sd[name].reshape(-1).view(torch.uint8).fill_(i % 251)
    for i, name in enumerate(names):
        raw = sd[name].reshape(-1).view(torch.uint8)
        assert bool((raw == i % 251).all()), f"{name} was overwritten by another tensor"


@pytest.mark.parametrize("read_path", PATHS)
def test_mutating_results_leaves_the_file_alone(
    misaligned_file: Path, tmp_path: Path, read_path: str
) -> None:
    path = tmp_path / "m.safetensors"
    shutil.copyfile(misaligned_file, path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    sd = load_state_dict(path, read_path=read_path)
    _scribble(sd, 0x5A)
    del sd
    gc.collect()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert_same(load_file(path), reference_load(misaligned_file))


@pytest.mark.parametrize("read_path", PATHS)
def test_results_survive_the_file_changing(ring_file: Path, tmp_path: Path, read_path: str) -> None:
    """Rewriting the file in place after a load must not show through (a tensor backed by a file
    mapping would change with it)."""
    path = tmp_path / "r.safetensors"
    shutil.copyfile(ring_file, path)
    sd = load_state_dict(path, read_path=read_path)
    size = path.stat().st_size
    header_end = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    with open(path, "r+b") as f:
        f.seek(header_end)
        f.write(b"\xee" * (size - header_end))
    assert_same(sd, reference_load(ring_file))
    path.unlink()
    gc.collect()
    assert_same(sd, reference_load(ring_file))


@pytest.mark.parametrize("read_path", PATHS)
def test_results_outlive_the_loader(ring_file: Path, tmp_path: Path, read_path: str) -> None:
    """Drop everything but the tensors, collect, then load other data through the same small ring: a
    tensor still pointing into a staging buffer would now hold the second file's bytes."""
    ft.configure(chunk_size=64 * 1024, ring_size=256 * 1024)
    result = load(ring_file, read_path=read_path)
    tensors = result.tensors
    del result
    gc.collect()
    other_specs = [random_spec(f"o{i}", "U8", (300_000,), 777 + i) for i in range(10)]
    other = write(tmp_path / "other.safetensors", build(other_specs))
    second = load_state_dict(other, read_path=read_path)
    assert_same(second, expected_tensors(other_specs))
    del second
    gc.collect()
    assert_same(tensors, reference_load(ring_file))


def test_clone_of_a_result_is_a_plain_copy(misaligned_file: Path) -> None:
    sd = load_file(misaligned_file)
    copy = clone_all(sd)
    _scribble(sd, 0)
    assert_same(copy, reference_load(misaligned_file))


def test_iter_tensors_pairs_are_independent(plain_shards_dir: Path) -> None:
    """Pairs already yielded stay intact while the iterator goes on to the next files."""
    kept = {}
    for name, t in ft.iter_tensors(plain_shards_dir):
        kept[name] = t
    gc.collect()
    assert_same(kept, reference_load(plain_shards_dir))
