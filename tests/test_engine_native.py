"""The cold read loop in C (``engine/ringread.c``, :mod:`flashtensors.engine.native`) on CPU: without the
CUDA entry points its copier copies each slot into a host arena with memcpy, so the readers, the slot
hand-offs and the error paths run as they do on a GPU. The arena's tensors are compared with
safetensors', bit for bit, on checkpoints built here."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from flashtensors.engine import api, native
from flashtensors.engine.plan import make_plan
from flashtensors.engine.sysio import Mapping, open_direct
from flashtensors.errors import FormatError
from helpers.compare import assert_same, checkpoint_files, reference_load
from helpers.stfile import build, random_spec, write

KiB = 1024

pytestmark = pytest.mark.skipif(
    native.library() is None, reason=f"the C loop cannot be built here: {native.unavailable_reason()}"
)


def _read(
    files: list[Path], threads: int, slot_size: int, nslots: int, direct: bool
) -> tuple[object, torch.Tensor, native.Stats]:
    plan = make_plan(files)
    arena = torch.zeros(plan.arena_size, dtype=torch.uint8)
    fds = []
    for r in plan.regions:
        fd = open_direct(r.path) if direct else None
        fds.append(fd if fd is not None else os.open(r.path, os.O_RDONLY))
    try:
        with Mapping(None, nslots * slot_size) as ring:
            stats = native.read_regions(
                list(plan.regions), fds, arena.data_ptr(), ring.address, slot_size, nslots, threads
            )
    finally:
        for fd in fds:
            os.close(fd)
    return plan, arena, stats


@pytest.mark.parametrize("threads,nslots", [(1, 2), (3, 4), (8, 12), (16, 3)])
@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_the_c_loop_loads_what_safetensors_loads(
    qwen3_dir: Path, threads: int, nslots: int, direct: bool
) -> None:
    """A Qwen3 checkpoint in several shards, 8 KiB slots (a shard spans many): every tensor as
    safetensors reads it, with any number of readers against any number of slots."""
    files = checkpoint_files(qwen3_dir)
    plan, arena, stats = _read(files, threads, 8 * KiB, nslots, direct)
    api._relocate(plan, arena)  # type: ignore[arg-type]
    assert_same(api._views(plan, arena), reference_load(qwen3_dir))  # type: ignore[arg-type]
    slots = sum(-(-r.nbytes // (8 * KiB)) for r in plan.regions)  # type: ignore[attr-defined]
    assert stats.reads == slots and stats.copies == slots
    assert stats.first_read <= stats.last_read


def test_regions_of_every_size(index_dir: Path, ring_file: Path, all_dtypes_file: Path) -> None:
    """Files smaller than a slot, larger, and unaligned ends: the arena holds each region's bytes."""
    files = [ring_file, all_dtypes_file, *checkpoint_files(index_dir)]
    plan, arena, _ = _read(files, 4, 64 * KiB, 6, True)
    for r in plan.regions:  # type: ignore[attr-defined]
        want = r.path.read_bytes()[r.file_start : r.file_end]
        assert bytes(arena[r.arena_offset : r.arena_offset + r.nbytes].numpy()) == want, r.path


def test_headers_longer_than_a_page(tmp_path: Path) -> None:
    """Files whose header runs past the first 4 KiB (as every real checkpoint's does): their regions
    start at a later page, and each byte still lands at its tensor's place."""
    files = []
    for k in range(2):
        specs = [
            random_spec(f"layers.{k}.{j}.weight", "BF16", (3 + j % 5, 7), seed=10 * k + j) for j in range(300)
        ]
        files.append(write(tmp_path / f"part{k}.safetensors", build(specs)))
    plan, arena, _ = _read(files, 5, 8 * KiB, 7, True)
    assert all(r.file_start >= 4096 for r in plan.regions)  # type: ignore[attr-defined]
    api._relocate(plan, arena)  # type: ignore[arg-type]
    ref: dict[str, torch.Tensor] = {}
    for f in files:
        ref.update(reference_load(f))
    assert_same(api._views(plan, arena), ref)  # type: ignore[arg-type]


def test_a_file_that_shrank_is_an_error_naming_it(
    tmp_path: Path, ring_file: Path, all_dtypes_file: Path
) -> None:
    """The plan was made from a longer file: the read comes up short, and the error says which file."""
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(ring_file.read_bytes())
    plan = make_plan([all_dtypes_file, victim])
    os.truncate(victim, plan.regions[1].file_end // 2)
    arena = torch.zeros(plan.arena_size, dtype=torch.uint8)
    fds = [os.open(r.path, os.O_RDONLY) for r in plan.regions]
    try:
        with Mapping(None, 4 * 16 * KiB) as ring, pytest.raises(FormatError, match="victim.safetensors"):
            native.read_regions(list(plan.regions), fds, arena.data_ptr(), ring.address, 16 * KiB, 4, 3)
    finally:
        for fd in fds:
            os.close(fd)


def test_a_failed_read_is_an_oserror_naming_the_file(ring_file: Path) -> None:
    """A descriptor that cannot be read (opened for writing only): EBADF, with the file's path; every
    thread is joined before the error is raised."""
    plan = make_plan([ring_file])
    arena = torch.zeros(plan.arena_size, dtype=torch.uint8)
    fd = os.open(ring_file, os.O_WRONLY)
    try:
        with Mapping(None, 4 * 16 * KiB) as ring, pytest.raises(OSError, match="ring.safetensors") as err:
            native.read_regions(list(plan.regions), [fd], arena.data_ptr(), ring.address, 16 * KiB, 4, 3)
    finally:
        os.close(fd)
    assert err.value.errno == 9  # EBADF


def test_an_error_while_reading_stops_the_loop(ring_file: Path) -> None:
    """``while_reading`` raising (as an interrupt would) stops the readers and joins them, then the
    error goes on; a second load then runs normally."""
    plan = make_plan([ring_file])
    arena = torch.zeros(plan.arena_size, dtype=torch.uint8)

    def boom() -> None:
        raise KeyboardInterrupt

    fd = os.open(ring_file, os.O_RDONLY)
    try:
        with Mapping(None, 4 * 16 * KiB) as ring:
            with pytest.raises(KeyboardInterrupt):
                native.read_regions(
                    list(plan.regions),
                    [fd],
                    arena.data_ptr(),
                    ring.address,
                    16 * KiB,
                    4,
                    3,
                    while_reading=boom,
                )
            native.read_regions(list(plan.regions), [fd], arena.data_ptr(), ring.address, 16 * KiB, 4, 3)
    finally:
        os.close(fd)
    r = plan.regions[0]
    assert (
        bytes(arena[r.arena_offset : r.arena_offset + r.nbytes].numpy())
        == ring_file.read_bytes()[r.file_start :]
    )


def test_the_library_is_built_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh cache: the build writes one library there, and a missing compiler is a reason, not a
    crash (the loads then take the Python loop)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "_packaged", lambda tag: None)  # as if the install built none
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    assert native.library() is not None
    built = list((tmp_path / "flashtensors" / "native").glob("ringread-*.so"))
    assert len(built) == 1
    assert [p.name for p in built[0].parent.iterdir()] == [built[0].name]  # no temporary left behind

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    assert native.library() is None
    assert "no C compiler" in native.unavailable_reason()


@pytest.mark.parametrize("stale", [False, True])
def test_an_installed_library_is_used_only_for_its_own_source(tmp_path: Path, stale: bool) -> None:
    """The install's library reports its source's tag; one built from another version of the source
    (an install older than the checkout) is passed over, and the loop is then built from this source."""
    source = (Path(native.__file__).parent / "ringread.c").read_bytes()
    tag = native._tag(source)
    built = "0" * 16 if stale else tag
    src = tmp_path / "ringread.c"
    src.write_bytes(source)
    cc = native._compiler()
    assert cc is not None
    cmd = [cc, "-O2", "-shared", "-fPIC", "-pthread", f'-DFT_SOURCE_TAG="{built}"']
    subprocess.run([*cmd, "-o", str(tmp_path / "_ringread.test.so"), str(src)], check=True)
    assert (native._packaged(tag, tmp_path) is None) == stale
