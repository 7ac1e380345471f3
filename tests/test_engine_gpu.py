"""The differential tests on a CUDA device, each read path forced on its own (skipped without CUDA).

Results are copied back with ``.cpu()`` and compared bit for bit with safetensors loading on CPU.
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import pytest
import torch

import flashtensors as ft
from flashtensors.engine.api import iter_tensors, load, load_file, load_state_dict
from helpers.compare import assert_same, drop_from_cache, reference_load
from helpers.nodirect import NoDirect
from helpers.stfile import build, expected_tensors, random_spec, write

pytestmark = pytest.mark.gpu

PATHS = ["buffered", "direct", "pinned-mmap", "auto"]
DEV = "cuda:0"


def _on_device(sd: dict[str, torch.Tensor]) -> None:
    for name, t in sd.items():
        assert t.device == torch.device(DEV), f"{name} on {t.device}"


@pytest.mark.parametrize("read_path", PATHS)
def test_every_dtype(all_dtypes_file: Path, read_path: str) -> None:
    sd = load_state_dict(all_dtypes_file, device=DEV, read_path=read_path)
    _on_device(sd)
    assert_same(sd, reference_load(all_dtypes_file), device=DEV)


@pytest.mark.parametrize("read_path", PATHS)
def test_misaligned(misaligned_file: Path, read_path: str) -> None:
    sd = load_state_dict(misaligned_file, device=DEV, read_path=read_path)
    assert_same(sd, reference_load(misaligned_file), device=DEV)


@pytest.mark.parametrize("read_path", PATHS)
def test_shards(index_dir: Path, plain_shards_dir: Path, read_path: str) -> None:
    assert_same(
        load_state_dict(index_dir, device=DEV, read_path=read_path), reference_load(index_dir), device=DEV
    )
    assert_same(
        load_state_dict(plain_shards_dir, device=DEV, read_path=read_path),
        reference_load(plain_shards_dir),
        device=DEV,
    )


@pytest.mark.parametrize("read_path", PATHS)
def test_file_larger_than_ring(ring_file: Path, read_path: str) -> None:
    ft.configure(chunk_size=64 * 1024, ring_size=256 * 1024)
    assert_same(
        load_state_dict(ring_file, device=DEV, read_path=read_path), reference_load(ring_file), device=DEV
    )


@pytest.mark.parametrize("read_path", PATHS)
def test_ring_reads_chunks_in_pieces(ring_file: Path, tmp_path: Path, read_path: str) -> None:
    """``read_size`` under the chunk, through the staging ring: cold (O_DIRECT, 16 KiB requests) and warm
    (the ring's page-cache reads of the tail)."""
    ft.configure(chunk_size=64 * 1024, ring_size=256 * 1024, read_size=16 * 1024, register_chunk=1024 * 1024)
    cold = tmp_path / "cold.safetensors"
    shutil.copyfile(ring_file, cold)
    want = reference_load(ring_file)
    if drop_from_cache(cold):
        assert_same(load_state_dict(cold, device=DEV, read_path=read_path), want, device=DEV)
    assert_same(load_state_dict(cold, device=DEV, read_path=read_path), want, device=DEV)


@pytest.mark.parametrize("read_path", PATHS)
def test_cold_file_larger_than_ring(ring_file: Path, tmp_path: Path, read_path: str) -> None:
    ft.configure(chunk_size=64 * 1024, ring_size=256 * 1024)
    cold = tmp_path / "cold.safetensors"
    shutil.copyfile(ring_file, cold)
    if not drop_from_cache(cold):
        pytest.skip("cannot make the file cold here")
    assert_same(load_state_dict(cold, device=DEV, read_path=read_path), reference_load(ring_file), device=DEV)


@pytest.mark.parametrize("read_path", PATHS)
def test_real_model(qwen3_dir: Path, read_path: str) -> None:
    assert_same(
        load_state_dict(qwen3_dir, device=DEV, read_path=read_path), reference_load(qwen3_dir), device=DEV
    )


@pytest.mark.parametrize("read_path", PATHS)
def test_dtype_conversion(all_dtypes_file: Path, read_path: str) -> None:
    # The reference casts on the GPU too: CPU and GPU casts may write different NaN payloads.
    ref = {
        k: (v.to(DEV).to(torch.bfloat16) if v.is_floating_point() else v)
        for k, v in reference_load(all_dtypes_file).items()
    }
    got = load_state_dict(all_dtypes_file, device=DEV, dtype=torch.bfloat16, read_path=read_path)
    assert_same(got, ref, device=DEV)


@pytest.mark.parametrize("device", [DEV, 0, torch.device(DEV)], ids=["str", "int", "torch.device"])
def test_load_file_device_forms(misaligned_file: Path, device: object) -> None:
    sd = load_file(misaligned_file, device=device)  # type: ignore[arg-type]
    _on_device(sd)
    assert_same(sd, reference_load(misaligned_file), device=DEV)


def test_iter_tensors(index_dir: Path) -> None:
    pairs = list(iter_tensors(index_dir, device=DEV))
    assert len({n for n, _ in pairs}) == len(pairs)
    assert_same(dict(pairs), reference_load(index_dir), device=DEV)


def test_stats(ring_file: Path) -> None:
    result = load(ring_file, device=DEV)
    assert result.stats.nbytes > 0 and result.stats.seconds > 0
    assert set(result.stats.paths.values()) <= {
        "direct",
        "pinned-mmap",
        "pinned-mmap+buffered",
        "buffered",
    }


@pytest.mark.parametrize("read_path", PATHS)
def test_stats_hold_the_reads_window(ring_file: Path, read_path: str) -> None:
    """The paths that read files (the ring's) time their reads; the page cache pinned in place reads
    nothing. With "auto" the file was just written, so it is cached: pinned in place."""
    result = load(ring_file, device=DEV, read_path=read_path)
    assert_same(result.tensors, reference_load(ring_file), device=DEV)
    if read_path in ("buffered", "direct"):
        assert result.stats.reads is not None
        first, last = result.stats.reads
        assert 0 <= first <= last <= result.stats.seconds
    elif set(result.stats.paths.values()) == {"pinned-mmap"}:
        assert result.stats.reads is None


@pytest.mark.parametrize("read_path", PATHS)
def test_two_loads_are_independent(ring_file: Path, read_path: str) -> None:
    first = load_state_dict(ring_file, device=DEV, read_path=read_path)
    second = load_state_dict(ring_file, device=DEV, read_path=read_path)
    for t in first.values():
        t.reshape(-1).view(torch.uint8).fill_(0xA5)
    assert_same(second, reference_load(ring_file), device=DEV)


@pytest.mark.parametrize("read_path", PATHS)
def test_results_outlive_the_loader(ring_file: Path, tmp_path: Path, read_path: str) -> None:
    """After the loader is gone and the same small ring carried another file, the first tensors hold."""
    ft.configure(chunk_size=64 * 1024, ring_size=256 * 1024)
    result = load(ring_file, device=DEV, read_path=read_path)
    tensors = result.tensors
    del result
    gc.collect()
    other_specs = [random_spec(f"o{i}", "U8", (300_000,), 555 + i) for i in range(10)]
    other = write(tmp_path / "other.safetensors", build(other_specs))
    assert_same(
        load_state_dict(other, device=DEV, read_path=read_path), expected_tensors(other_specs), device=DEV
    )
    gc.collect()
    torch.cuda.synchronize()
    assert_same(tensors, reference_load(ring_file), device=DEV)


@pytest.mark.parametrize("read_path", PATHS)
def test_results_survive_the_file_changing(misaligned_file: Path, tmp_path: Path, read_path: str) -> None:
    path = tmp_path / "m.safetensors"
    shutil.copyfile(misaligned_file, path)
    sd = load_state_dict(path, device=DEV, read_path=read_path)
    header_end = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    with open(path, "r+b") as f:
        f.seek(header_end)
        f.write(b"\x11" * (path.stat().st_size - header_end))
    torch.cuda.synchronize()
    assert_same(sd, reference_load(misaligned_file), device=DEV)


def test_values_usable_on_device(misaligned_file: Path) -> None:
    """Kernels run on the returned tensors (a misaligned device pointer would fault or read wrong)."""
    sd = load_file(misaligned_file, device=DEV)
    ref = reference_load(misaligned_file)
    for name, t in sd.items():
        if t.is_floating_point():
            torch.testing.assert_close(t.double().cpu(), ref[name].double(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("read_path", PATHS)
def test_concurrent_loads(ring_file: Path, misaligned_file: Path, tmp_path: Path, read_path: str) -> None:
    """Several threads loading at once must not share staging slots or pinned ranges."""
    from concurrent.futures import ThreadPoolExecutor

    ft.configure(chunk_size=64 * 1024, ring_size=256 * 1024)
    specs = [random_spec(f"t{j}", "BF16", (70_001 + j,), 3000 + j) for j in range(8)]
    other = write(tmp_path / "other.safetensors", build(specs, data_start_mod8=3))
    files = [ring_file, other, misaligned_file, ring_file]  # the same file twice, too
    expected = [reference_load(ring_file), expected_tensors(specs), reference_load(misaligned_file)]
    expected.append(expected[0])
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda f: load_state_dict(f, device=DEV, read_path=read_path), files * 2))
    for got, want in zip(results, expected * 2, strict=True):
        assert_same(got, want, device=DEV)


@pytest.mark.parametrize("read_path", PATHS)
def test_load_waits_for_work_queued_on_recycled_memory(ring_file: Path, read_path: str) -> None:
    """Memory the caching allocator hands to the load may still be read by a kernel queued on the
    current stream; copies on side streams must wait for that stream, or the kernel reads weights."""
    ft.configure(chunk_size=64 * 1024, ring_size=256 * 1024)
    # One free 12 MiB segment (nothing else cached) is where the ~4 MB arena must come from.
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    size = 12 << 20
    victim = torch.full((size,), 7, dtype=torch.uint8, device=DEV)
    torch.cuda.synchronize()
    lo, hi = victim.data_ptr(), victim.data_ptr() + size
    torch.cuda._sleep(500_000_000)  # keep the stream busy (~0.3 s) so the clone below runs late
    witness = victim.clone()  # queued behind the sleep: reads victim's memory after the load started
    del victim  # back to the allocator, reusable at once by anything on this stream
    sd = load_state_dict(ring_file, device=DEV, read_path=read_path)
    reused = any(lo <= t.data_ptr() < hi for t in sd.values() if t.numel())
    torch.cuda.synchronize()
    if not reused:
        pytest.skip("the allocator did not recycle the freed block for this load")
    assert bool((witness == 7).all()), "a kernel queued before the load read bytes the load wrote"
    assert_same(sd, reference_load(ring_file), device=DEV)


@pytest.mark.parametrize("at_open", [True, False], ids=["open_refused", "reads_refused"])
def test_direct_falls_back_cleanly(ring_file: Path, monkeypatch: pytest.MonkeyPatch, at_open: bool) -> None:
    ft.configure(chunk_size=64 * 1024, ring_size=256 * 1024)
    NoDirect(monkeypatch, at_open)
    result = load(ring_file, device=DEV, read_path="direct")
    assert_same(result.tensors, reference_load(ring_file), device=DEV)
    assert set(result.stats.paths.values()) == {"buffered"}


@pytest.mark.parametrize("probe_bytes", [1, 2 * 1024 * 1024])
def test_slow_pinning_switches_to_the_ring(
    index_dir: Path, ring_file: Path, monkeypatch: pytest.MonkeyPatch, probe_bytes: int
) -> None:
    # Pretend pinning is slow everywhere, so the switch happens after the first chunk (probe 1 byte)
    # or after two 1 MiB chunks (part-way into the larger file): the rest must still arrive intact.
    from flashtensors.engine import pinned_mmap

    monkeypatch.setattr(pinned_mmap, "SLOW_PIN_GBPS", float("inf"))
    monkeypatch.setattr(pinned_mmap, "_PROBE_BYTES", probe_bytes)
    ft.configure(register_chunk=1024 * 1024, warm_ring_threads=0)  # the ring only after the switch
    for checkpoint in (index_dir, ring_file):  # 4 tiny shards; one 2.8 MB file
        result = load(checkpoint, device=DEV, read_path="pinned-mmap")
        assert_same(result.tensors, reference_load(checkpoint), device=DEV)
        switched = any("buffered" in p for p in result.stats.paths.values())
        assert switched == (probe_bytes == 1 or checkpoint == ring_file)


def _ring_claims_first(monkeypatch: pytest.MonkeyPatch, any_size: bool = True) -> None:
    """Make the pinning thread's first registration wait until the ring's readers have tried to claim a
    chunk, so both sides of a warm load take part where the file is larger than the first piece (either
    could otherwise take all of a small file). With ``any_size``, the ring reads small loads too."""
    import threading

    from flashtensors.engine import devices, pinned_mmap, readers

    if any_size:
        monkeypatch.setattr(pinned_mmap, "RING_MIN_BYTES", 0)

    claimed = threading.Event()
    warm = threading.Event()  # a warm load is running (a cold one pins ring slots on this thread too)
    back, register, read_warm = readers.Split.back, devices.host_register, pinned_mmap.read_pinned_mmap

    def claim(self: object, want: int) -> object:
        got = back(self, want)  # type: ignore[arg-type]
        claimed.set()
        return got

    def host_register(address: int, nbytes: int) -> None:
        ring_reading = any(t.name.startswith("flash-ring") for t in threading.enumerate())
        if threading.current_thread() is threading.main_thread() and ring_reading and warm.is_set():
            assert claimed.wait(30), "the ring's readers never claimed a chunk"
        register(address, nbytes)

    def read_pinned_mmap(*args: object, **kwargs: object) -> object:
        warm.set()
        try:
            return read_warm(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            warm.clear()

    monkeypatch.setattr(readers.Split, "back", claim)
    monkeypatch.setattr(devices, "host_register", host_register)
    monkeypatch.setattr(pinned_mmap, "read_pinned_mmap", read_pinned_mmap)


@pytest.mark.parametrize("threads", [1, 3])
def test_warm_load_pins_the_head_and_rings_the_tail(
    index_dir: Path, ring_file: Path, misaligned_file: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    _ring_claims_first(monkeypatch)
    ft.configure(
        register_chunk=1024 * 1024, chunk_size=64 * 1024, ring_size=256 * 1024, warm_ring_threads=threads
    )
    for checkpoint in (ring_file, misaligned_file, index_dir):
        result = load(checkpoint, device=DEV, read_path="pinned-mmap")
        assert_same(result.tensors, reference_load(checkpoint), device=DEV)
        paths = list(result.stats.paths.values())
        assert set(paths) <= {"pinned-mmap", "pinned-mmap+buffered", "buffered"}
        if checkpoint == ring_file:  # 2.8 MB: more than the first 1 MiB piece and the ring's 4 slots
            assert paths == ["pinned-mmap+buffered"]


def test_the_ring_reads_a_small_warm_load_only_once_it_is_ready(
    ring_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below RING_MIN_BYTES a warm load pins only, until this process's ring has its slots pinned."""
    from flashtensors.engine import staging

    _ring_claims_first(monkeypatch, any_size=False)
    ft.configure(register_chunk=1024 * 1024, chunk_size=64 * 1024, ring_size=384 * 1024)  # a new ring
    first = load(ring_file, device=DEV, read_path="pinned-mmap")
    assert set(first.stats.paths.values()) == {"pinned-mmap"}
    assert not staging.ring_is_ready(ft.get_settings())
    load(ring_file, device=DEV, read_path="direct")  # 44 chunks through 6 slots: every slot pinned
    assert staging.ring_is_ready(ft.get_settings())
    second = load(ring_file, device=DEV, read_path="pinned-mmap")
    assert set(second.stats.paths.values()) == {"pinned-mmap+buffered"}
    assert_same(second.tensors, reference_load(ring_file), device=DEV)


@pytest.mark.parametrize("failing", ["ring read", "registration"])
def test_a_failure_with_the_ring_running_fails_the_load_and_frees_everything(
    ring_file: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """A ring reader's read error, or the pinning thread's second cudaHostRegister failing, fails the
    load with that error; the ring is let go and every piece unpinned, so the same file loads again."""
    from flashtensors.engine import devices, ring_feeder
    from flashtensors.errors import DeviceError

    _ring_claims_first(monkeypatch)
    ft.configure(register_chunk=1024 * 1024, chunk_size=64 * 1024, ring_size=256 * 1024, warm_ring_threads=2)
    module, name = (ring_feeder, "pread_full") if failing == "ring read" else (devices, "host_register")
    working = getattr(module, name)  # for host_register: the waiting wrapper
    calls = []

    def fails(*args: object) -> object:
        calls.append(args)
        if failing == "ring read":
            raise OSError(5, "Input/output error")
        if len(calls) == 2:
            raise DeviceError("cudaHostRegister failed (simulated)")
        return working(*args)

    monkeypatch.setattr(module, name, fails)
    with pytest.raises(OSError if failing == "ring read" else DeviceError, match="Input/output|simulated"):
        load(ring_file, device=DEV, read_path="pinned-mmap")
    monkeypatch.setattr(module, name, working)
    result = load(ring_file, device=DEV, read_path="pinned-mmap")
    assert_same(result.tensors, reference_load(ring_file), device=DEV)


@pytest.mark.parametrize("chunk", [None, 1024 * 1024], ids=["one-registration", "1MiB-registrations"])
def test_hot_loads_from_pinned_files(
    misaligned_file: Path,
    index_dir: Path,
    ring_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    chunk: int | None,
) -> None:
    """Files pinned in the RAM tier load by one DMA per registration, bit for bit, misaligned tensors
    relocated; with 1 MiB registrations the copies are cut at registration boundaries."""
    from flashtensors.engine import pinned

    if chunk is not None:
        pin_one = pinned._pin_one
        monkeypatch.setattr(pinned, "_pin_one", lambda path, _chunk, threads: pin_one(path, chunk, threads))
    ft.configure(mem_pool_size=1 << 30)
    try:
        for checkpoint in (misaligned_file, index_dir, ring_file):
            ft.pin(checkpoint)
            result = load(checkpoint, device=DEV)
            assert set(result.stats.paths.values()) == {"pinned"}
            assert_same(result.tensors, reference_load(checkpoint), device=DEV)
    finally:
        ft.unpin()


def test_side_streams_are_bounded_and_shared_across_threads(ring_file: Path) -> None:
    """Reader threads come and go with each load; the streams they take must not grow with them."""
    import threading

    from flashtensors.engine import streams

    dev = torch.device(DEV)
    caller = torch.cuda.current_stream(dev)
    got: list[int] = []

    def take() -> None:
        got.append(streams.side_stream(dev, caller).cuda_stream)

    for _ in range(3 * streams._STREAMS_PER_DEVICE):
        t = threading.Thread(target=take)
        t.start()
        t.join()
    assert len(got) == 3 * streams._STREAMS_PER_DEVICE
    assert 1 < len(set(got)) <= streams._STREAMS_PER_DEVICE
    ft.configure(chunk_size=64 * 1024, ring_size=256 * 1024)
    for _ in range(3):  # each load's reader threads are new ones, served from the same streams
        sd = load_state_dict(ring_file, device=DEV, read_path="direct")
        assert_same(sd, reference_load(ring_file), device=DEV)
    assert len(streams._pool[dev]) <= streams._STREAMS_PER_DEVICE
    streams.make_streams(dev, 2 * streams._STREAMS_PER_DEVICE)  # made ahead by a load: still bounded
    assert len(streams._pool[dev]) == streams._STREAMS_PER_DEVICE


@pytest.mark.parametrize("read_path", PATHS)
def test_gpu_tensors_start_on_256_byte_boundaries(index_dir: Path, read_path: str) -> None:
    """As in their own allocations (cuBLAS picks kernels by operand alignment)."""
    from flashtensors.format.safetensors import read_header

    sd = load_state_dict(index_dir, device=DEV, read_path=read_path)
    checked = 0
    for f in sorted(index_dir.glob("*.safetensors")):
        header = read_header(f)
        for t in header.tensors:
            if t.nbytes and (t.start - header.data_start) % 256 == 0:
                assert sd[t.name].data_ptr() % 256 == 0, t.name
                checked += 1
    assert checked >= 4  # at least each shard's first tensor
    assert_same(sd, reference_load(index_dir), device=DEV)


def test_priming_the_copy_path_makes_the_streams_once(ring_file: Path) -> None:
    from flashtensors.engine import streams

    dev = torch.device(DEV)
    streams._primed.discard(dev)
    streams.prime_copies(dev, 4)
    assert dev in streams._primed and 4 <= len(streams._pool[dev]) <= streams._STREAMS_PER_DEVICE
    ft.configure(chunk_size=64 * 1024, ring_size=256 * 1024)
    assert_same(
        load_state_dict(ring_file, device=DEV, read_path="direct"), reference_load(ring_file), device=DEV
    )


@pytest.mark.parametrize("pin_cache", [True, False], ids=["pin_cache", "no_pin_cache"])
def test_cached_file_without_pinning_the_cache(ring_file: Path, pin_cache: bool) -> None:
    """pin_cache=False reads a cached file through the staging ring: the same bytes, nothing left to unpin."""
    from flashtensors.engine import pinned_mmap

    ft.configure(chunk_size=64 * 1024, ring_size=256 * 1024, warm_ring_threads=0)
    pinned_mmap.wait_for_releases()  # an earlier test's background unpin is not this load's
    ring_file.read_bytes()
    result = load(ring_file, device=DEV, pin_cache=pin_cache)
    assert_same(result.tensors, reference_load(ring_file), device=DEV)
    assert set(result.stats.paths.values()) == ({"pinned-mmap"} if pin_cache else {"buffered"})
    assert bool(pinned_mmap._releases) == pin_cache  # the pinned-in-place cache is unpinned later


@pytest.mark.parametrize("runtime", ["direct", "through_torch"])
def test_ring_copies_with_and_without_direct_runtime_calls(
    ring_file: Path, monkeypatch: pytest.MonkeyPatch, runtime: str
) -> None:
    """The ring's copies call cudaMemcpyAsync through ctypes (no tensor over a slot); where the runtime
    cannot be called directly they go through torch. The same bytes either way."""
    from flashtensors.engine import devices, staging

    if runtime == "through_torch":
        monkeypatch.setattr(devices._rt(), "lib", None)
    assert devices.raw_copies() == (runtime == "direct")
    ring_size = 256 * 1024 if runtime == "direct" else 320 * 1024  # a ring of its own
    ft.configure(chunk_size=64 * 1024, ring_size=ring_size)
    for read_path in ("direct", "buffered"):
        result = load(ring_file, device=DEV, read_path=read_path)
        assert_same(result.tensors, reference_load(ring_file), device=DEV)
    ring = staging.staging_ring(ft.get_settings())
    assert all(slot.pinned for slot in ring.slots)
    assert all((slot.tensor is None) == (runtime == "direct") for slot in ring.slots)


@pytest.mark.parametrize("runtime", ["direct", "through_torch"])
def test_warm_copies_with_and_without_direct_runtime_calls(
    ring_file: Path, monkeypatch: pytest.MonkeyPatch, runtime: str
) -> None:
    """A warm load's pinned page-cache pieces are copied with cudaMemcpyAsync through ctypes too, and
    through torch where the runtime cannot be called directly. The same bytes either way."""
    from flashtensors.engine import devices, pinned_mmap

    if runtime == "through_torch":
        monkeypatch.setattr(devices._rt(), "lib", None)
    calls: list[int] = []
    raw_copy = devices.copy_to_device

    def counted(dst: int, src: int, nbytes: int, stream: torch.cuda.Stream) -> bool:
        calls.append(nbytes)
        return raw_copy(dst, src, nbytes, stream)

    monkeypatch.setattr(devices, "copy_to_device", counted)
    ft.configure(register_chunk=1024 * 1024, warm_ring_threads=0)  # pieces of 1 MiB, pinned only
    pinned_mmap.wait_for_releases()
    ring_file.read_bytes()
    result = load(ring_file, device=DEV)
    assert_same(result.tensors, reference_load(ring_file), device=DEV)
    assert set(result.stats.paths.values()) == {"pinned-mmap"}
    data_start = 8 + int.from_bytes(ring_file.read_bytes()[:8], "little")
    region_start = data_start // 4096 * 4096  # regions start on the page that holds the first tensor
    assert len(calls) > 1 and sum(calls) == ring_file.stat().st_size - region_start


@pytest.mark.parametrize("read_path", ["direct", "buffered"])
def test_views_error_reaches_the_caller(
    ring_file: Path, monkeypatch: pytest.MonkeyPatch, read_path: str
) -> None:
    """The ring paths build the tensor views while the reads fly: an error there is raised by the load,
    the readers stop, the ring is let go, and the next load is whole."""
    from flashtensors.engine import api, staging

    ft.configure(chunk_size=64 * 1024, ring_size=256 * 1024)

    def broken(plan: object, arena: torch.Tensor) -> dict[str, torch.Tensor]:
        raise RuntimeError("views broke")

    with monkeypatch.context() as m:
        m.setattr(api, "_views", broken)
        with pytest.raises(RuntimeError, match="views broke"):
            load(ring_file, device=DEV, read_path=read_path)
    ring = staging.staging_ring(ft.get_settings())
    assert ring.lock.acquire(blocking=False), "the failed load kept the staging ring"
    ring.lock.release()
    again = load(ring_file, device=DEV, read_path=read_path)
    assert_same(again.tensors, reference_load(ring_file), device=DEV)


def test_a_big_cold_load_grows_the_auto_ring(ring_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ring_size`` auto with ``read_size`` set: a load of BIG_LOAD cold bytes or more reads through a
    ring of four slots per reader; a smaller load after it keeps that ring. The bytes are the
    reference's both times."""
    from flashtensors.engine import staging

    monkeypatch.setattr(staging, "_rings", {})  # no ring grown by an earlier test
    settings = ft.configure(chunk_size=64 * 1024, read_size=64 * 1024)
    monkeypatch.setattr(staging, "BIG_LOAD", 1)
    big = load(ring_file, device=DEV, read_path="direct")
    assert_same(big.tensors, reference_load(ring_file), device=DEV)
    ring = staging.staging_ring(settings)
    assert len(ring.slots) == staging.BIG_SLOTS_PER_READER * settings.io_threads
    monkeypatch.setattr(staging, "BIG_LOAD", 1 << 60)
    small = load(ring_file, device=DEV, read_path="direct")
    assert_same(small.tensors, reference_load(ring_file), device=DEV)
    assert staging.staging_ring(settings) is ring


def test_cold_reads_land_in_one_and_a_half_slots_per_reader(
    ring_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``read_size`` and ``ring_size`` auto, each O_DIRECT reader reads whole DIRECT_SLOT slots from
    a ring of 1.5 slots per reader: the reference's bytes, bit for bit, through at most that many."""
    from flashtensors.engine import staging

    monkeypatch.setattr(staging, "_rings", {})
    monkeypatch.setattr(staging, "DIRECT_SLOT", 64 * 1024)  # ~44 reads of a ~3 MB file
    settings = ft.configure(io_threads=4)
    cold = load(ring_file, device=DEV, read_path="direct")
    assert set(cold.stats.paths.values()) == {"direct"}
    assert_same(cold.tensors, reference_load(ring_file), device=DEV)
    ring = staging._rings[64 * 1024][1]
    assert len(ring.slots) == 6  # 4 readers x 1.5
    assert ring_file.stat().st_size > 4 * len(ring.slots) * ring.slot_size  # each slot read many times
    assert any(slot.pinned for slot in ring.slots)  # a slot is pinned on its first use
    assert staging.staging_ring(settings, 4, 1, 64 * 1024, direct=True) is ring  # the next load's ring


def test_cold_reads_go_through_small_slots_of_their_own(
    ring_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``read_size`` auto, O_DIRECT reads fill whole slots of at most DIRECT_SLOT, one request each,
    in a ring apart from the ``chunk_size`` ring that buffered reads use; both give the reference's
    bytes, and neither load replaces the other's ring."""
    from flashtensors.engine import staging

    monkeypatch.setattr(staging, "_rings", {})
    monkeypatch.setattr(staging, "DIRECT_SLOT", 64 * 1024)
    settings = ft.configure(chunk_size=256 * 1024)
    cold = load(ring_file, device=DEV, read_path="direct")
    assert set(cold.stats.paths.values()) == {"direct"}
    assert_same(cold.tensors, reference_load(ring_file), device=DEV)
    buffered = load(ring_file, device=DEV, read_path="buffered")
    assert_same(buffered.tensors, reference_load(ring_file), device=DEV)
    assert sorted(staging._rings) == [64 * 1024, 256 * 1024]
    direct_ring = staging._rings[64 * 1024][1]
    assert any(slot.pinned for slot in direct_ring.slots)  # the cold load's copies came from it
    assert staging.staging_ring(settings, settings.io_threads, 1, 64 * 1024, direct=True) is direct_ring
