"""Edges where readers go off by one: file sizes around page and chunk boundaries, empty shards, many
shards, names in two shards, concurrent loads."""

from __future__ import annotations

import os
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import flashtensors as ft
from flashtensors.engine.api import load_file, load_state_dict
from flashtensors.errors import FlashError
from helpers.compare import assert_same, reference_load
from helpers.stfile import Spec, build, expected_tensors, pack, random_spec, write

PATHS = ["buffered", "direct", "pinned-mmap", "auto"]
KiB = 1024
CHUNK = 64 * KiB


def _file_of_size(path: Path, total: int, seed: int) -> list[Spec]:
    """A file of exactly ``total`` bytes: one U8 tensor filling whatever the header leaves."""
    probe = build([random_spec("x", "U8", (1,), seed)])
    data_start = 8 + struct.unpack("<Q", probe[:8])[0]
    # The header's length does not depend on the tensor's size until the digits grow: iterate once.
    for _ in range(3):
        specs = [random_spec("x", "U8", (total - data_start,), seed)]
        blob = build(specs)
        data_start = 8 + struct.unpack("<Q", blob[:8])[0]
        if len(blob) == total:
            break
    assert len(blob) == total
    write(path, blob)
    return specs


SIZES = [4096 - 1, 4096, 4096 + 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 4095, 5 * CHUNK + 4097]


@pytest.mark.parametrize("read_path", PATHS)
def test_file_sizes_around_boundaries(tmp_path: Path, read_path: str) -> None:
    ft.configure(chunk_size=CHUNK, ring_size=4 * CHUNK)
    for i, total in enumerate(SIZES):
        path = tmp_path / f"size_{total}.safetensors"
        specs = _file_of_size(path, total, seed=i)
        assert_same(load_state_dict(path, read_path=read_path), expected_tensors(specs))


@pytest.mark.parametrize("read_path", PATHS)
def test_header_ending_on_a_page_boundary(tmp_path: Path, read_path: str) -> None:
    """The byte buffer starts exactly at 4096 (header padded to 4088 bytes)."""
    specs = [random_spec("a", "BF16", (1000,), 1), random_spec("b", "U8", (5000,), 2)]
    blob = build(specs)
    n = struct.unpack("<Q", blob[:8])[0]
    padded = struct.pack("<Q", 4088) + blob[8 : 8 + n] + b" " * (4088 - n) + blob[8 + n :]
    path = write(tmp_path / "page.safetensors", padded)
    assert_same(load_state_dict(path, read_path=read_path), expected_tensors(specs))


@pytest.mark.parametrize("read_path", PATHS)
def test_shard_without_tensors_among_others(tmp_path: Path, read_path: str) -> None:
    root = tmp_path / "ckpt"
    a = [random_spec("a", "F32", (33,), 1)]
    b = [random_spec("b", "I64", (7,), 2)]
    write(root / "a.safetensors", build(a))
    write(root / "b_empty.safetensors", pack({"__metadata__": {"format": "pt"}}))
    write(root / "c.safetensors", build(b))
    assert_same(load_state_dict(root, read_path=read_path), expected_tensors(a + b))


@pytest.mark.parametrize("read_path", ["buffered", "direct"])
def test_many_shards(tmp_path: Path, read_path: str) -> None:
    root = tmp_path / "many"
    specs = []
    for i in range(60):
        s = random_spec(f"s{i}.w", "BF16", (i + 1, 3), 100 + i)
        write(root / f"shard-{i:03d}.safetensors", build([s]))
        specs.append(s)
    assert_same(load_state_dict(root, read_path=read_path), expected_tensors(specs))


def test_name_in_two_shards_is_an_error(tmp_path: Path) -> None:
    """Two shards that both define a tensor: which one wins would be an accident of file order."""
    root = tmp_path / "dup"
    write(root / "a.safetensors", build([random_spec("w", "F32", (2,), 1)]))
    write(root / "b.safetensors", build([random_spec("w", "F32", (2,), 2)]))
    with pytest.raises(FlashError) as info:
        load_state_dict(root)
    assert "a.safetensors" in info.value.message and "b.safetensors" in info.value.message


def test_same_file_twice_in_a_list(misaligned_file: Path) -> None:
    with pytest.raises(FlashError):
        load_state_dict([misaligned_file, misaligned_file])


def test_positional_device_like_safetensors(misaligned_file: Path) -> None:
    assert_same(load_file(misaligned_file, "cpu"), reference_load(misaligned_file))


@pytest.mark.parametrize("read_path", PATHS)
def test_concurrent_loads(tmp_path: Path, ring_file: Path, read_path: str) -> None:
    """Four threads loading at once (a server loading several models): no shared buffer between them."""
    ft.configure(chunk_size=CHUNK, ring_size=4 * CHUNK)
    files = [ring_file]
    expected = [reference_load(ring_file)]
    for i in range(3):
        specs = [random_spec(f"t{j}", "F16", (50_000 + 977 * j,), 1000 * i + j) for j in range(6)]
        files.append(write(tmp_path / f"c{i}.safetensors", build(specs, data_start_mod8=i)))
        expected.append(expected_tensors(specs))
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda f: load_state_dict(f, read_path=read_path), files * 2))
    for got, want in zip(results, expected * 2, strict=True):
        assert_same(got, want)


def test_symlinked_shards_in_an_odd_folder_name(index_dir: Path, tmp_path: Path) -> None:
    """The HF cache layout: snapshot files are symlinks into a blobs folder."""
    blobs = tmp_path / "blobs"
    snap = tmp_path / "my model é" / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in index_dir.iterdir():
        blob = blobs / f"blob-{f.name}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(blob)
    for read_path in PATHS:
        assert_same(load_state_dict(snap, read_path=read_path), reference_load(index_dir))


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_no_descriptor_or_thread_leaks(index_dir: Path, tmp_path: Path) -> None:
    """Loads, failed loads and fallbacks leave no open files or reader threads behind."""
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    write(bad_dir / "a.safetensors", build([random_spec("a", "U8", (10,), 1)]))
    write(bad_dir / "b.safetensors", build([random_spec("b", "U8", (10,), 2)])[:-1])
    load_state_dict(index_dir)  # first use may start lazily created, long-lived things
    fds, threads = _open_fds(), threading.active_count()
    for read_path in PATHS:
        for _ in range(3):
            load_state_dict(index_dir, read_path=read_path)
            with pytest.raises(FlashError):
                load_state_dict(bad_dir, read_path=read_path)
            list(ft.iter_tensors(index_dir))
    assert _open_fds() == fds
    assert threading.active_count() == threads


def test_header_cache_sees_a_rewritten_file(tmp_path: Path) -> None:
    """Headers of settled files are cached; a rewrite (new size or time) is parsed again, and a file
    rewritten within the same clock tick is never served from the cache."""
    from flashtensors.format import safetensors as fmt

    path = tmp_path / "m.safetensors"
    first = [random_spec("a", "F32", (64,), 1)]
    write(path, build(first))
    old = time.time() - 60
    os.utime(path, (old, old))
    assert [t.name for t in fmt.read_header(path).tensors] == ["a"]
    assert fmt.read_header(path) is fmt.read_header(path)  # settled: served from the cache
    second = [random_spec("b", "F32", (64,), 2)]  # same size, other name
    write(path, build(second))
    os.utime(path, (old + 1, old + 1))  # settled, but not the time the cached header was read at
    assert [t.name for t in fmt.read_header(path).tensors] == ["b"]
    assert_same(load_state_dict(path), expected_tensors(second))
    # Racy: read just after writing, then rewritten within the same clock tick (emulated by giving the
    # rewrite the first write's exact time). The first read must not have been cached.
    third, fourth = [random_spec("c", "F32", (64,), 3)], [random_spec("d", "F32", (64,), 4)]
    write(path, build(third))
    assert [t.name for t in fmt.read_header(path).tensors] == ["c"]
    tick = path.stat().st_mtime_ns
    write(path, build(fourth))
    os.utime(path, ns=(tick, tick))
    assert [t.name for t in fmt.read_header(path).tensors] == ["d"]


def test_plan_is_reused_only_while_every_header_is_unchanged(tmp_path: Path) -> None:
    """A load of unchanged, settled files reuses its layout; a rewritten shard gets a fresh one, and the
    load returns the new bytes bit for bit."""
    from flashtensors.engine.plan import make_plan

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write(a, build([random_spec("x", "F32", (64,), 1)]))
    write(b, build([random_spec("y", "BF16", (8, 8), 2)]))
    old = time.time() - 60
    for p in (a, b):
        os.utime(p, (old, old))
    first = make_plan([a, b])
    assert make_plan([a, b]) is first
    assert make_plan([b, a]) is not first  # another order is another layout
    assert [p.info.name for p in make_plan([b, a]).placements] == ["y", "x"]
    grown = [random_spec("y", "BF16", (8, 8), 2), random_spec("z", "F16", (3,), 3)]
    write(b, build(grown))
    os.utime(b, (old + 1, old + 1))
    second = make_plan([a, b])
    assert second is not first
    assert [p.info.name for p in second.placements] == ["x", "y", "z"]
    assert_same(load_state_dict([a, b]), expected_tensors([random_spec("x", "F32", (64,), 1), *grown]))


@pytest.mark.parametrize("mod8", [0, 3, 5])
def test_gpu_plans_put_tensors_on_256_byte_boundaries(tmp_path: Path, mod8: int) -> None:
    """A plan for a GPU arena shifts each file's region so its tensors start on 256-byte boundaries
    (cuBLAS picks kernels by operand alignment); a CPU plan keeps regions on 4096 boundaries. Either
    way regions do not overlap and fit the arena."""
    from flashtensors.engine.plan import GPU_TENSOR_ALIGN, make_plan

    files = []
    for i in range(3):
        path = tmp_path / f"s{i}.safetensors"
        specs = [random_spec(f"s{i}.w{j}", "BF16", (16, 8 * (j + 1)), 10 * i + j) for j in range(4)]
        write(path, build(specs, data_start_mod8=mod8))
        files.append(path)
    old = time.time() - 60  # settled files: their plans are cached, one per alignment
    for path in files:
        os.utime(path, (old, old))
    cpu, gpu = make_plan(files), make_plan(files, GPU_TENSOR_ALIGN)
    assert gpu is not cpu and make_plan(files) is cpu and make_plan(files, GPU_TENSOR_ALIGN) is gpu
    assert all(r.arena_offset % 4096 == 0 for r in cpu.regions)
    for plan in (cpu, gpu):
        ends = 0
        for r in plan.regions:
            assert r.arena_offset >= ends
            ends = r.arena_offset + r.span
        assert plan.arena_size >= ends
    by_file = {r.path: r for r in gpu.regions}
    for p in gpu.placements:
        region = next(r for r in gpu.regions if r.header.tensors and p.info in r.header.tensors)
        assert region is by_file[region.path]
        if (p.info.start - region.header.data_start) % GPU_TENSOR_ALIGN == 0:
            assert p.offset % GPU_TENSOR_ALIGN == 0, p.info.name
    assert sum(1 for p in gpu.placements if p.offset % GPU_TENSOR_ALIGN == 0) >= 3  # each file's first


@pytest.mark.parametrize("read_path", PATHS)
def test_a_few_bytes_load_after_the_views_warm_up(tmp_path: Path, read_path: str) -> None:
    """The engine's import takes the views' torch paths once on the CPU (api.warm_views); a checkpoint of
    three bytes, smaller than what the warm-up views, still loads whole."""
    import torch

    from flashtensors.engine import api

    assert torch.device("cpu") in api._views_warmed
    api.warm_views(torch.empty(3, dtype=torch.uint8, device="meta"))  # under 16 bytes: nothing to take
    assert torch.device("meta") not in api._views_warmed
    path = write(tmp_path / "tiny.safetensors", build([random_spec("b", "U8", (3,), seed=5)]))
    assert_same(load_state_dict(path, read_path=read_path), reference_load(path))


def test_views_warm_up_skips_what_it_cannot_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """The warm-up runs at import, so a view it cannot build (here: wider dtypes over a strided tensor)
    is skipped rather than raised; the device still counts as warmed."""
    import torch

    from flashtensors.engine import api

    monkeypatch.setattr(api, "_views_warmed", set())
    strided = torch.empty(64, dtype=torch.uint8, device="meta")[::2]
    with pytest.raises(RuntimeError):
        strided[0:8].view(torch.float32)  # what the warm-up meets for every dtype wider than a byte
    api.warm_views(strided)
    assert api._views_warmed == {torch.device("meta")}
