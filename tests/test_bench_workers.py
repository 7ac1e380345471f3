"""How `flash bench run` starts its workers and prepares caches: fork server, rotation, crashes, timeouts,
the interleaved disk read and the warm read that is skipped when the files are resident."""

from __future__ import annotations

import json
import mmap
import multiprocessing
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from flashtensors.bench import launcher
from flashtensors.bench.cache import drop_cache, is_resident, warm_cache
from flashtensors.bench.launcher import Launcher
from flashtensors.bench.limits import disk_bandwidth, disk_read, shape_name
from flashtensors.bench.options import BenchCheckpoint, RunOptions, resolve_checkpoint
from flashtensors.bench.report import summarize
from flashtensors.bench.runner import judge_run, rotation, run_bench
from helpers.benchckpt import make_tiny
from helpers.nodirect import NoDirect


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory, "bench-workers", seed=7, layers=1, vocab=320)


@pytest.fixture
def fifo_ckpt(ckpt_dir: Path, tmp_path: Path) -> tuple[BenchCheckpoint, Path]:
    """A checkpoint whose last shard becomes a FIFO once its header is read: a worker that opens it
    blocks until someone opens the other end, as on a stuck disk."""
    copy = Path(shutil.copytree(ckpt_dir, tmp_path / "ckpt"))
    ckpt = resolve_checkpoint(copy)
    fifo = ckpt.files[-1]
    fifo.unlink()
    os.mkfifo(fifo)
    return ckpt, fifo


def _spec(ckpt: BenchCheckpoint, loader: str, scenario: str = "warm") -> dict[str, Any]:
    return {
        "kind": "load",
        "loader": loader,
        "scenario": scenario,
        "device": "cpu",
        "directory": str(ckpt.directory),
        "files": [str(f) for f in ckpt.files],
        "names": list(ckpt.names),
        "cache_drop": "fadvise",
    }


def test_rotation_starts_repeat_r_at_member_r_mod_n() -> None:
    members = ["a", "b", "c"]
    assert [rotation(members, r) for r in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]
    assert rotation([], 2) == []


def test_exec_and_fork_server_workers_return_the_same_bytes(ckpt_dir: Path) -> None:
    ckpt = resolve_checkpoint(ckpt_dir)
    spec = _spec(ckpt, "flashtensors")
    with Launcher("exec") as exe, Launcher() as fork:
        by_exec, by_fork = exe.run(spec, 300), fork.run(spec, 300)
    reference = ckpt.reference
    assert by_exec["checksums"] == by_fork["checksums"] == reference
    assert by_exec["worker"]["start"] == "exec" and by_fork["worker"]["start"] == "forkserver"
    assert by_exec["worker"]["exit"] == by_fork["worker"]["exit"] == 0
    assert by_fork["worker"]["parent"]["cuda_initialized"] is False
    assert by_exec["wall_seconds"] > by_exec["seconds"] and by_fork["wall_seconds"] > by_fork["seconds"]


def _fork_child(tmp_path: Path, name: str) -> dict[str, Any]:
    """Run the fork-server child body in a child forked from this process (whose state we control)."""
    result, log = tmp_path / f"{name}.json", tmp_path / f"{name}.log"
    proc = multiprocessing.get_context("fork").Process(
        target=launcher._child, args=({"kind": "probe"}, dict(os.environ), str(result), str(log))
    )
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0, log.read_text()
    return json.loads(result.read_text())


def test_a_child_forked_from_a_parent_with_cuda_initialized_refuses_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This process is CUDA-free on a CPU machine; on a GPU machine pytest may have touched CUDA already
    # (collecting GPU tests asks torch.cuda.is_available()), and then its child must refuse too.
    now = {
        "cuda_initialized": torch.cuda.is_initialized(),
        "cuda_driver_loaded": launcher._cuda_driver_loaded(),
    }
    as_is = _fork_child(tmp_path, "as-is")
    assert as_is["worker"]["parent"] == {"pid": os.getpid(), "torch_imported": True, **now}
    assert ("error" in as_is) == now["cuda_initialized"]
    # The parent's state is taken at the fork itself (os.register_at_fork), so a parent that set up
    # CUDA at any time before it is caught, whoever initialized it.
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_initialized", lambda: True)
        dirty = _fork_child(tmp_path, "torch")
    assert dirty["worker"]["parent"]["cuda_initialized"] is True
    assert "had initialized CUDA" in dirty["error"]
    # A mapped libcuda alone is no reason to refuse: a CUDA build of torch maps it at import without
    # initializing the driver. It is recorded, and the child runs.
    driver = tmp_path / "libcuda.so.1"
    driver.write_bytes(b"\0" * 4096)
    with open(driver, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ):
        mapped = _fork_child(tmp_path, "driver")
    assert mapped["worker"]["parent"]["cuda_driver_loaded"] is True
    assert mapped["worker"]["parent"]["cuda_initialized"] is now["cuda_initialized"]
    assert ("error" in mapped) == now["cuda_initialized"]  # refused only for what torch itself did


def _child_waiting_on_fifo(server: int, within: float = 120.0) -> int:
    """The fork server's child once it waits in open() for the FIFO's writer (a bounded wait on /proc;
    by then the child has set up its log and faulthandler)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for pid in Path(f"/proc/{server}/task/{server}/children").read_text().split():
            try:
                if Path(f"/proc/{pid}/wchan").read_text() == "wait_for_partner":
                    return int(pid)
            except OSError:  # exited meanwhile
                continue
    raise AssertionError("no worker of the fork server came to wait on the FIFO")


def test_a_worker_that_crashes_is_that_runs_error(fifo_ckpt: tuple[BenchCheckpoint, Path]) -> None:
    ckpt, _ = fifo_ckpt  # the load waits forever in open(): the worker is alive until it is killed
    spec = _spec(ckpt, "safetensors")
    records: list[dict[str, Any]] = []
    with Launcher() as launcher:
        server = launcher.warm_up()["server_pid"]  # its probe child has exited and been reaped
        running = threading.Thread(target=lambda: records.append(launcher.run(spec, 120)))
        running.start()
        victim = _child_waiting_on_fifo(server)
        os.kill(victim, signal.SIGSEGV)
        running.join(120)
    (record,) = records
    assert record["worker"] == {"start": "forkserver", "pid": victim, "exit": -signal.SIGSEGV}
    assert record["error"].startswith("worker was killed by SIGSEGV and left no result: ")
    assert "Fatal Python error: Segmentation fault" in record["error"]  # faulthandler, from the log
    record.update(loader="safetensors", scenario="warm", repeat=0)
    judge_run(record, ckpt)
    (row,) = summarize({"checkpoint": {"bytes": ckpt.nbytes}, "options": {"device": "cpu"}, "runs": [record]})
    assert record["status"] == row["status"] == "error" and "SIGSEGV" in row["note"]


def test_a_worker_that_hangs_is_killed_at_the_timeout(fifo_ckpt: tuple[BenchCheckpoint, Path]) -> None:
    ckpt, _ = fifo_ckpt  # nobody opens the other end: safetensors waits forever in open()
    options = RunOptions(
        loaders=["flashtensors", "safetensors"], scenarios=["warm"], repeat=1, device="cpu", limits=False
    )
    options.timeout = 1.0
    report = run_bench(ckpt, options)
    refused, hung = report["runs"]
    # flashtensors refuses a shard that is not a regular file: an ordinary error, and the run goes on.
    assert refused["loader"] == "flashtensors" and refused["error"].startswith("ModelNotFound")
    assert refused["worker"]["exit"] == 0
    assert hung["loader"] == "safetensors" and hung["error"] == "timed out after 1 s (killed)"
    assert hung["worker"]["exit"] is None and hung["wall_seconds"] >= 1.0
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(hung["worker"]["pid"], 0)
    assert [r["status"] for r in report["runs"]] == [r["status"] for r in summarize(report)] == ["error"] * 2


def test_warm_cache_reads_only_the_files_not_resident(ckpt_dir: Path) -> None:
    files = sorted(ckpt_dir.glob("*.safetensors"))
    warm_cache(files)
    assert all(is_resident(f) for f in files)
    assert warm_cache(files) == 0  # everything resident: nothing read
    victim = files[len(files) // 2]
    drop_cache([victim], "fadvise")
    cold = [f for f in files if not is_resident(f)]
    assert cold in ([victim], [])  # tmpfs ignores the drop and keeps the pages
    assert warm_cache(files) == sum(f.stat().st_size for f in cold)
    assert all(is_resident(f) for f in files)


def test_disk_read_reads_every_byte_with_o_direct_or_says_it_could_not(ckpt_dir: Path) -> None:
    files = sorted(ckpt_dir.glob("*.safetensors"))
    got = disk_read(files, 2, "fadvise")
    assert got["bytes"] == sum(f.stat().st_size for f in files) and got["gbps"] > 0
    assert got["threads"] == 2 and got["cache_drop"] == "fadvise"
    assert got["method"] == "O_DIRECT" or "O_DIRECT refused" in got["note"]


@pytest.mark.parametrize("at_open", [True, False], ids=["open-refused", "read-refused"])
def test_disk_reads_fall_back_to_buffered_where_o_direct_is_refused(
    ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch, at_open: bool
) -> None:
    files = sorted(ckpt_dir.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    NoDirect(monkeypatch, at_open)
    got = disk_read(files, 4, "fadvise")
    assert got["method"] == "buffered-after-drop" and "O_DIRECT refused" in got["note"]
    assert got["bytes"] == total and got["threads"] == 4 and got["request"] == 16 * 1024**2
    limit = disk_bandwidth(files, total, "fadvise")
    assert limit["method"] == "buffered-after-drop" and set(limit["threads"]) == {"1", "4", "8", "16"}
    assert set(limit["shapes"]) == {"1x16M", "4x16M", "8x16M", "16x16M", "16x512K"}
    assert limit["gbps"] == max(limit["shapes"].values())
    assert limit["gbps"] == limit["shapes"][shape_name(limit["best_threads"], limit["best_request"])]
