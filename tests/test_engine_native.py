"""The cold read loop in C (``engine/ringread.c``, :mod:`flashtensors.engine.native`) on CPU: without the
CUDA entry points each reader copies its own slot into a host arena with memcpy, so the readers, their
claims and the error paths run as they do on a GPU; with stand-in entry points the copies, events and
pins go through the runtime's calls. The arena's tensors are compared with safetensors', bit for bit, on
checkpoints built here."""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from flashtensors.engine import api, devices, native
from flashtensors.engine.plan import Plan, make_plan
from flashtensors.engine.sysio import Mapping, open_direct
from flashtensors.errors import DeviceError, FormatError
from helpers.compare import assert_same, checkpoint_files, reference_load
from helpers.stfile import build, random_spec, write

KiB = 1024

pytestmark = pytest.mark.skipif(
    native.library() is None, reason=f"the C loop cannot be built here: {native.unavailable_reason()}"
)


def _read(
    files: list[Path], threads: int, slot_size: int, nslots: int, direct: bool, **kwargs: Any
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
                list(plan.regions), fds, arena.data_ptr(), ring.address, slot_size, nslots, threads, **kwargs
            )
    finally:
        for fd in fds:
            os.close(fd)
    return plan, arena, stats


def assert_holds_the_file(plan: Plan, arena: torch.Tensor, path: Path) -> None:
    """The arena holds the one-file plan's region: the file's bytes from its data start on."""
    r = plan.regions[0]
    assert (
        bytes(arena[r.arena_offset : r.arena_offset + r.nbytes].numpy()) == path.read_bytes()[r.file_start :]
    )


@pytest.mark.parametrize("threads,nslots", [(1, 2), (3, 4), (8, 12), (16, 3)])
@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_the_c_loop_loads_what_safetensors_loads(
    qwen3_dir: Path, threads: int, nslots: int, direct: bool
) -> None:
    """A Qwen3 checkpoint in several shards, 8 KiB slots (a shard spans many): every tensor as
    safetensors reads it, with any number of readers against any number of slots (more readers than
    slots: one reader a slot), each reader copying its own slot."""
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


def test_a_refused_direct_read_is_direct_refused(ring_file: Path) -> None:
    """An O_DIRECT read the kernel refuses with EINVAL (here: into a slot off the memory alignment
    O_DIRECT needs, as a filesystem that takes O_DIRECT at open and refuses its reads does) is
    DirectRefused, which sends the load to the Python loop."""
    fd = open_direct(ring_file)
    if fd is None:
        pytest.skip("this filesystem refuses O_DIRECT at open")
    plan = make_plan([ring_file])
    arena = torch.zeros(plan.arena_size, dtype=torch.uint8)
    try:
        with (
            Mapping(None, 5 * 16 * KiB) as ring,
            pytest.raises(native.DirectRefused, match="ring.safetensors"),
        ):
            native.read_regions(list(plan.regions), [fd], arena.data_ptr(), ring.address + 1, 16 * KiB, 4, 3)
    finally:
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
    assert_holds_the_file(plan, arena, ring_file)


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


class FakeRuntime:
    """The CUDA entry points as ctypes callbacks on the host. A copy is queued, as on a stream, and made
    (a memmove from the slot as it is then) only when an event recorded behind it is waited on: a slot
    read into again before its copy's event was waited on gives the arena the wrong bytes, and a copy
    never waited on gives it none. Events and pins are noted. The C loop calls them from its threads as it
    would call the runtime's."""

    def __init__(self, copy_error: int = 0, register_error: int = 0) -> None:
        self.copy_error, self.register_error = copy_error, register_error  # what the calls return
        self.lock = threading.Lock()
        self.registered: list[int] = []  # addresses
        self.recorded: dict[int, int] = {}  # event -> times recorded
        self.waited: dict[int, int] = {}  # event -> times waited on
        self.recorders: dict[int, set[int]] = {}  # calling thread -> the events it recorded
        self.queued: dict[int, list[tuple[int, int, int]]] = {}  # calling thread -> copies not recorded
        self.behind: dict[int, list[tuple[int, int, int]]] = {}  # event -> copies recorded, not waited on
        copy_t = ctypes.CFUNCTYPE(
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p
        )
        record_t = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
        sync_t = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
        device_t = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)
        register_t = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint)
        self._keep = [
            copy_t(self._copy),
            record_t(self._record),
            sync_t(self._sync),
            device_t(lambda device: 0),
            register_t(self._register),
        ]
        self.points = {  # in the order of devices.ENTRY_POINTS
            n: int(ctypes.cast(f, ctypes.c_void_p).value or 0)
            for n, f in zip(devices.ENTRY_POINTS, self._keep, strict=True)
        }

    def _copy(self, dst: int, src: int, n: int, kind: int, stream: int) -> int:
        if self.copy_error:
            return self.copy_error
        with self.lock:
            self.queued.setdefault(threading.get_ident(), []).append((dst, src, n))
        return 0

    def _record(self, event: int, stream: int) -> int:
        me = threading.get_ident()
        with self.lock:
            self.recorded[event] = self.recorded.get(event, 0) + 1
            self.recorders.setdefault(me, set()).add(event)
            self.behind.setdefault(event, []).extend(self.queued.pop(me, []))
        return 0

    def _sync(self, event: int) -> int:
        with self.lock:
            self.waited[event] = self.waited.get(event, 0) + 1
            done = self.behind.pop(event, [])
        for dst, src, n in done:
            ctypes.memmove(dst, src, n)
        return 0

    def all_copies_done(self) -> bool:
        """Every copy queued was made (an event behind it was waited on)."""
        with self.lock:
            return not any(self.queued.values()) and not any(self.behind.values())

    def _register(self, address: int, n: int, flags: int) -> int:
        if self.register_error:
            return self.register_error
        with self.lock:
            self.registered.append(address)
        return 0


FAKE_THREADS, FAKE_SLOT = 4, 16 * KiB
FAKE_EVENTS = range(1000, 1100)  # the readers' events: reader t's is FAKE_EVENTS[t]


def _read_through(
    fake: FakeRuntime, path: Path, nslots: int, pinned: bytearray | None, threads: int = FAKE_THREADS
) -> tuple[Plan, torch.Tensor, native.Stats, list[int]]:
    """One file read by the C loop with ``fake``'s entry points, ``nslots`` slots of FAKE_SLOT and
    ``threads`` readers asked for: the plan, the arena, the stats, and the slots pinned (in order). The
    events array and the ring have room for ``threads`` readers, so that a reader past the last slot
    would read and copy in mapped memory and record an event the test can see."""
    plan = make_plan([path])
    arena = torch.zeros(plan.arena_size, dtype=torch.uint8)
    room = max(threads, nslots)
    events = (ctypes.c_void_p * room)(*FAKE_EVENTS[:room])
    fd = os.open(path, os.O_RDONLY)
    try:
        with Mapping(None, room * FAKE_SLOT) as ring:
            stats = native.read_regions(
                list(plan.regions), [fd], arena.data_ptr(), ring.address, FAKE_SLOT, nslots, threads,
                stream=1, events=ctypes.addressof(events), entry_points=fake.points, pinned=pinned,
            )  # fmt: skip
            slots = [(a - ring.address) // FAKE_SLOT for a in fake.registered]
    finally:
        os.close(fd)
    return plan, arena, stats, slots


def test_slots_are_pinned_at_their_first_copy_once(ring_file: Path) -> None:
    """With the runtime's entry points (stand-ins here): every slot a load uses and that was not pinned
    is pinned once, by the reader that owns it, and marked; a slot pinned before is left alone."""
    fake = FakeRuntime()
    pinned = bytearray([1, 0, 0, 0, 0, 0])  # slot 0 pinned by an earlier load
    plan, arena, stats, slots = _read_through(fake, ring_file, len(pinned), pinned)
    assert_holds_the_file(plan, arena, ring_file)
    slots.sort()
    assert len(slots) == len(set(slots)) and 0 not in slots  # each once; the pinned one never
    used = set(range(FAKE_THREADS))  # reader t's slot t; slots 4 and 5 are left alone
    assert set(slots) == used - {0}
    assert list(pinned) == [int(k in used) for k in range(len(pinned))]
    assert stats.copies == stats.reads > 0


def test_each_reader_waits_for_its_copy_before_reading_into_its_slot_again(ring_file: Path) -> None:
    """Each reader records its own event behind each copy of its slot and waits on it before the slot is
    read into again: the stand-in makes a copy only when that wait comes, so the arena holds the file
    only if every wait came, and came before the next read."""
    fake = FakeRuntime()
    plan, arena, stats, _ = _read_through(fake, ring_file, 6, bytearray(6))
    assert_holds_the_file(plan, arena, ring_file)
    assert fake.all_copies_done()
    assert sum(fake.recorded.values()) == sum(fake.waited.values()) == stats.copies == stats.reads > 0
    assert fake.recorded == fake.waited
    mine = list(fake.recorders.values())  # each reader one event of its own
    assert all(len(e) == 1 for e in mine) and len(set().union(*mine)) == len(mine) <= FAKE_THREADS
    assert set().union(*mine) <= set(FAKE_EVENTS[:FAKE_THREADS])


def test_more_readers_than_slots_run_one_reader_a_slot(ring_file: Path) -> None:
    """Asked for 8 readers over 3 slots, the loop runs 3: only the 3 slots are read into, copied from
    and waited on through the first 3 events, and the arena holds the file."""
    fake = FakeRuntime()
    plan, arena, stats, _ = _read_through(fake, ring_file, 3, None, threads=8)
    assert_holds_the_file(plan, arena, ring_file)
    assert fake.all_copies_done()
    assert set(fake.recorded) <= set(FAKE_EVENTS[:3]) and len(fake.recorders) <= 3
    assert stats.copies == stats.reads > 0


@pytest.mark.parametrize(
    "fails,message",
    [
        ("register", r"pinning a 16 KiB staging slot .*cudaHostRegister.* error 2\b"),
        ("copy", r"cudaMemcpyAsync.* error 700\b"),
    ],
)
def test_a_refused_pin_or_copy_fails_the_load_with_what_was_refused(
    ring_file: Path, fails: str, message: str
) -> None:
    """The runtime refuses a slot's pin (as over a memlock limit: cudaErrorMemoryAllocation) or a copy:
    the load fails with a DeviceError naming the call, its error and what to do, and every reader has
    ended when it does (the process's threads, C ones included, as before the load)."""
    _read_through(FakeRuntime(), ring_file, 6, bytearray(6))  # any pool a load starts lazily now runs
    fake = FakeRuntime(register_error=2) if fails == "register" else FakeRuntime(copy_error=700)
    before = os_threads()
    with pytest.raises(DeviceError, match=message) as caught:
        _read_through(fake, ring_file, 6, bytearray(6))
    assert caught.value.hint  # says what to do next
    assert os_threads() == before


def os_threads() -> int:
    """The process's threads as the kernel counts them: Python's and the C loop's alike."""
    return len(os.listdir("/proc/self/task"))


def test_the_entry_points_need_the_readers_events(ring_file: Path) -> None:
    """With the runtime's entry points and no events array, nothing starts: each reader needs its event
    to wait for its copies."""
    plan = make_plan([ring_file])
    arena = torch.zeros(plan.arena_size, dtype=torch.uint8)
    fd = os.open(ring_file, os.O_RDONLY)
    try:
        with Mapping(None, 4 * FAKE_SLOT) as ring, pytest.raises(ValueError, match="events"):
            native.read_regions(
                list(plan.regions), [fd], arena.data_ptr(), ring.address, FAKE_SLOT, 4, 4,
                entry_points=FakeRuntime().points,
            )  # fmt: skip
    finally:
        os.close(fd)
