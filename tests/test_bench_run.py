"""`flash bench run` on CPU: fresh-process runs, checksums equal across loaders, FAIL on wrong bytes."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch

from flashtensors.bench import loaders as loaders_mod
from flashtensors.bench import worker
from flashtensors.bench.cache import chunks, drop_cache, parallel_read, timed_parallel_read, warm_cache
from flashtensors.bench.checksum import compare_checksums, digests, tensor_digest
from flashtensors.bench.limits import limit_for, shape_name
from flashtensors.bench.options import RunOptions, resolve_checkpoint
from flashtensors.bench.pool import pool
from flashtensors.bench.report import failures, format_table, summarize
from flashtensors.bench.runner import DISK, engine_settings, judge_run, rotation, run_bench
from flashtensors.cli.app import main
from flashtensors.errors import ConfigError, DeviceError
from helpers.benchckpt import make_tiny


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory, "bench-run", seed=3)


def _spec(ckpt_dir: Path, loader: str, scenario: str = "warm") -> dict[str, Any]:
    ckpt = resolve_checkpoint(ckpt_dir)
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


def test_cli_run_on_cpu_checksums_agree_and_peers_are_skipped(
    ckpt_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json = tmp_path / "results" / "bench.json"
    code = main([
        "bench", "run", str(ckpt_dir), "--device", "cpu", "--repeat", "2",
        "--loaders", "safetensors-mmap,flashtensors,safetensors,instanttensor,fastsafetensors",
        "--scenarios", "warm,cold", "--cache-drop", "fadvise",
        "--json", str(out_json), "--limit-bytes", "1M", "--memcpy-bytes", "16M",
    ])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out_json.read_text())
    ckpt = resolve_checkpoint(ckpt_dir)
    assert report["checkpoint"]["reference_checksums"] == ckpt.reference
    assert len(ckpt.reference) >= 3
    assert report["settings"] == engine_settings()  # the FLASH_* variables the workers inherited
    pooled = {r["scenario"]: r for r in pool([report])}  # `flash bench pool` reads this file as written
    assert pooled["cold"]["rounds"] == pooled["warm"]["rounds"] == 2
    assert "of_raw" in pooled["cold"] and "of_raw" not in pooled["warm"]
    assert pooled["cold"]["peers"]["safetensors"]["rounds"] == 2
    runs, disk_runs = report["runs"], report["disk_runs"]
    # --loaders order is repeat 1's order; repeat 2 starts one further on. In cold the raw disk read
    # is one more member of the rotation.
    # Peers that are not installed here are skipped (on the GPU machine some are installed).
    asked = ["safetensors-mmap", "flashtensors", "safetensors", "instanttensor", "fastsafetensors"]
    given = [name for name in asked if not loaders_mod.unavailable(name, "cpu", "warm")]
    assert given[:3] == asked[:3]
    cold = [*given, DISK]
    expected = [("warm", m, 0) for m in given] + [("warm", m, 1) for m in rotation(given, 1)]
    expected += [("cold", m, 0) for m in cold] + [("cold", m, 1) for m in rotation(cold, 1)]
    done = sorted(runs + disk_runs, key=lambda r: r["order"])
    assert [(r["scenario"], r.get("loader", DISK), r["repeat"]) for r in done] == expected
    assert [r["order"] for r in done] == list(range(1, len(expected) + 1))
    for r in runs:
        assert r["status"] == "ok", r
        assert r["checksums"] == ckpt.reference, r["loader"]
        assert r["bytes"] == ckpt.nbytes and r["tensors"] == ckpt.tensors
        assert r["seconds"] > 0 and r["peak_rss_bytes"] > 0
        assert set(r["faults"]) == {"major", "minor"} and r["faults"]["minor"] > 0  # it touches new pages
        assert set(r["setup_seconds"]) == {"device", "imports", "prepare"}
    assert {r["cache"] for r in runs if r["scenario"] == "cold"} == {"fadvise"}
    assert all(r["warm_read_bytes"] >= 0 for r in runs if r["scenario"] == "warm")
    # Every run, disk reads included, is a fresh child of one fork server that had torch imported
    # and CUDA untouched; each record keeps the wall time the runner saw.
    workers = report["workers"]
    assert workers["start"] == "forkserver" and workers["server_pid"] not in (None, os.getpid())
    assert "torch" in workers["preload"] and workers["startup_seconds"] > 0
    server = {
        "pid": workers["server_pid"],
        "torch_imported": True,
        "cuda_initialized": False,
    }
    for r in runs + disk_runs:
        assert r["worker"]["start"] == "forkserver" and r["worker"]["exit"] == 0
        parent = dict(r["worker"]["parent"])
        # Recorded, not judged: a CUDA build of torch maps libcuda at import (False on this CPU build).
        assert isinstance(parent.pop("cuda_driver_loaded"), bool)
        assert parent == server
        assert r["wall_seconds"] >= r["seconds"] > 0
    assert len({r["worker"]["pid"] for r in runs + disk_runs}) == len(runs + disk_runs)
    skipped = {(s["loader"], s["scenario"]): s["note"] for s in report["skipped"]}
    assert "supports only cuda" in skipped[("instanttensor", "warm")]
    if importlib.util.find_spec("fastsafetensors") is None:
        assert "not installed" in skipped[("fastsafetensors", "cold")]
    limits = report["limits"]
    assert limits["disk"]["gbps"] > 0 and set(limits["disk"]["threads"]) == {"1", "4", "8", "16"}
    assert limits["page_cache"]["gbps"] > 0 and limits["memcpy"]["gbps"] > 0
    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["date"]
    assert report["failures"] == [] and report["command"].startswith("flash bench run ")
    # The interleaved disk reads: whole files, cache dropped, at the limits step's best thread count;
    # their median is cold's ceiling, and the start-of-run figure stays beside it.
    file_bytes = sum(f.stat().st_size for f in ckpt.files)
    best, request = limits["disk"]["best_threads"], limits["disk"]["best_request"]
    assert limits["disk"]["shapes"][shape_name(best, request)] == limits["disk"]["gbps"]
    for r in disk_runs:
        assert r["status"] == "ok" and r["bytes"] == file_bytes
        assert r["threads"] == best and r["request"] == request
        assert r["method"] in ("O_DIRECT", "buffered-after-drop") and r["cache_drop"] == "fadvise"
    inter = limits["disk_interleaved"]
    assert inter["gbps"] == statistics.median(r["gbps"] for r in disk_runs)
    assert inter["threads"] == best and inter["request"] == request
    # The summary behind the table: medians, speed-up against safetensors, skipped pairs.
    summary = {(r["scenario"], r["loader"]): r for r in report["summary"]}
    assert summary[("warm", "safetensors")]["speedup"] == 1.0
    cold_row = summary[("cold", "flashtensors")]
    assert cold_row["limit"] == "disk_interleaved" and cold_row["limit_gbps"] == inter["gbps"]
    assert cold_row["ratio"] == pytest.approx(cold_row["gbps"] / inter["gbps"])
    assert cold_row["start_limit_gbps"] == limits["disk"]["gbps"]
    assert cold_row["start_ratio"] == pytest.approx(cold_row["gbps"] / limits["disk"]["gbps"])
    assert summary[("warm", "instanttensor")]["status"] == "skipped"
    row = next(line for line in out.splitlines() if line.startswith("warm      safetensors "))
    assert row.split()[-3:] == ["1.00x", "ok", "2"]
    assert "cold 'of limit' uses this median" in out and " disk_interleaved " in out
    assert "workers: forkserver" in out
    assert "[  1/14] warm  safetensors-mmap  #1" in err and "skip instanttensor warm" in err
    assert f"cold  {DISK}" in err


def _corrupt(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    bad = dict(state)
    t = state[name].clone()
    t.view(torch.uint8).view(-1)[0] ^= 1  # one bit of one tensor
    bad[name] = t
    return bad


def test_a_corrupted_loader_result_is_a_failure(ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = resolve_checkpoint(ckpt_dir)
    victim = ckpt.names[len(ckpt.names) // 2]
    real = loaders_mod.LOADERS["safetensors"]
    broken = loaders_mod.Loader(
        real.name, real.modules, real.devices, lambda t, d: _corrupt(dict(real.load(t, d)), victim), "broken"
    )
    monkeypatch.setitem(loaders_mod.LOADERS, "safetensors", broken)
    good = worker.run_load(_spec(ckpt_dir, "safetensors-mmap"))
    bad = worker.run_load(_spec(ckpt_dir, "safetensors"))
    for rep, record in enumerate((good, bad)):
        record["repeat"] = rep
        judge_run(record, ckpt)
    assert good["status"] == "ok" and good["checksums"] == ckpt.reference
    assert bad["status"] == "FAIL"
    assert bad["checksums"][victim] != ckpt.reference[victim]
    assert bad["mismatches"] == [
        f"{victim}: expected {ckpt.reference[victim]}, got {bad['checksums'][victim]}"
    ]
    report = {
        "checkpoint": {"bytes": ckpt.nbytes},
        "options": {"device": "cpu"},
        "runs": [good, bad],
        "limits": {},
    }
    assert failures(report) == [f"safetensors warm #2: {bad['mismatches'][0]}"]
    rows = {r["loader"]: r for r in summarize(report)}
    assert rows["safetensors"]["status"] == "FAIL" and rows["safetensors-mmap"]["status"] == "ok"
    assert "FAIL" in format_table(list(rows.values()))


def test_compare_checksums() -> None:
    t = torch.arange(10, dtype=torch.bfloat16)
    ref = {"a": tensor_digest(t), "b": tensor_digest(t * 2)}
    assert compare_checksums(ref, digests({"a": t, "b": t * 2}, ["a", "b"])) == []
    bad = compare_checksums(ref, digests({"a": t, "b": t * 3}, ["a", "b"]))
    assert [m.name for m in bad] == ["b"]
    missing = compare_checksums(ref, digests({"a": t}, ["a", "b"]))
    assert [(m.name, m.got) for m in missing] == [("b", "missing")]
    assert len(compare_checksums(ref, None)) == 2
    # Same bytes whatever the view: a non-contiguous tensor hashes as its row-major copy.
    m = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert tensor_digest(m.t()) == tensor_digest(m.t().contiguous())


def test_worker_reports_a_failed_load_as_an_error(ckpt_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _spec(ckpt_dir, "safetensors")
    spec["files"] = [str(ckpt_dir / "model-99999-of-99999.safetensors")]
    assert worker.main([json.dumps(spec)]) == 1
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(worker.RESULT_PREFIX)
    record = json.loads(line[len(worker.RESULT_PREFIX) :])
    assert "model-99999" in record["error"]
    judge_run(record, resolve_checkpoint(ckpt_dir))
    assert record["status"] == "error"


def test_hot_is_a_second_load_in_the_same_process_on_cpu(ckpt_dir: Path) -> None:
    record = worker.run_load(_spec(ckpt_dir, "flashtensors", "hot"))
    assert record["hot"].startswith("second load in the same process")
    assert record["checksums"] == resolve_checkpoint(ckpt_dir).reference


def test_limit_for_each_scenario() -> None:
    limits = {
        "disk": {"gbps": 1.6},
        "page_cache": {"gbps": 17.7},
        "memcpy": {"gbps": 6.1},
        "h2d_pinned": {"gbps": 54.3},
    }
    assert limit_for("cold", limits, "cuda") == (1.6, "disk")
    assert limit_for("warm", limits, "cuda") == (17.7, "page_cache")
    assert limit_for("warm", limits, "cpu") == (6.1, "memcpy")
    assert limit_for("hot", limits, "cuda:0") == (54.3, "h2d_pinned")
    assert limit_for("hot", limits, "cpu") == (6.1, "memcpy")
    assert limit_for("e2e", limits, "cuda") == (None, "")
    assert limit_for("cold", {"disk": {"gbps": None, "error": "x"}}, "cpu") == (None, "disk")


def test_warm_limit_on_gpu_is_the_faster_way_capped_by_pcie() -> None:
    """Warm bytes reach a GPU by pinning the page cache in place or by reading it into pinned buffers:
    the ceiling is the faster of the two, each no faster than PCIe."""
    limits = {"page_cache": {"gbps": 30.4}, "h2d_pinned": {"gbps": 55.1}, "page_cache_pin": {"gbps": 41.2}}
    assert limit_for("warm", limits, "cuda") == (41.2, "page_cache_pin")
    limits["page_cache_pin"] = {"gbps": 60.0}
    assert limit_for("warm", limits, "cuda") == (55.1, "h2d_pinned")
    limits["page_cache_pin"] = {"gbps": None, "error": "OSError: refused"}
    assert limit_for("warm", limits, "cuda") == (30.4, "page_cache")
    # On CPU pinning is no way in: the page-cache read and memcpy bound it.
    limits["page_cache_pin"] = {"gbps": 41.2}
    assert limit_for("warm", limits | {"memcpy": {"gbps": 20.0}}, "cpu") == (20.0, "memcpy")


def test_summary_medians_ratios_and_speedups() -> None:
    def run(loader: str, seconds: float, status: str = "ok") -> dict[str, Any]:
        return {"loader": loader, "scenario": "cold", "seconds": seconds, "status": status}

    report = {
        "checkpoint": {"bytes": 8_000_000_000},
        "options": {"device": "cuda"},
        "limits": {"disk": {"gbps": 2.0}},
        "runs": [run("safetensors", s) for s in (8.0, 7.0, 9.0)]
        + [run("flashtensors", s) for s in (4.0, 5.0, 100.0)]
        + [{"loader": "runai", "scenario": "cold", "status": "error", "error": "boom"}],
        "skipped": [{"loader": "instanttensor", "scenario": "cold", "note": "not installed"}],
    }
    rows = {r["loader"]: r for r in summarize(report)}
    st, ft = rows["safetensors"], rows["flashtensors"]
    assert st["seconds"] == 8.0 and st["gbps"] == pytest.approx(1.0) and st["ratio"] == pytest.approx(0.5)
    assert ft["seconds"] == 5.0 and ft["speedup"] == pytest.approx(1.6) and ft["ratio"] == pytest.approx(0.8)
    assert rows["runai"]["status"] == "error" and rows["runai"]["note"] == "boom"
    assert rows["instanttensor"]["status"] == "skipped"
    md = format_table(list(rows.values()), markdown=True).splitlines()
    assert md[0].startswith("| scenario | loader |") and "| 1.60x |" in md[3]


def test_summary_of_the_reads_window() -> None:
    """Our runs' reads apart from what surrounds them: the rate between first and last read, and the
    time before and after (medians); a loader whose runs carry no window gets no such note."""

    def run(loader: str, seconds: float, reads: list[float] | None) -> dict[str, Any]:
        out = {"loader": loader, "scenario": "cold", "seconds": seconds, "status": "ok"}
        return out | ({"reads": reads} if reads else {})

    report = {
        "checkpoint": {"bytes": 2_000_000_000},
        "options": {"device": "cuda"},
        "limits": {"disk": {"gbps": 2.5}},
        "runs": [
            run("flashtensors", 1.05, [0.02, 1.02]),  # 2.0 GB/s; 20 ms before, 30 after
            run("flashtensors", 1.30, [0.05, 1.30]),  # 1.6; 50, 0
            run("flashtensors", 0.90, [0.01, 0.81]),  # 2.5; 10, 90
            run("fastsafetensors", 1.0, None),
        ],
    }
    rows = {r["loader"]: r for r in summarize(report)}
    ft = rows["flashtensors"]
    assert ft["reads_gbps"] == pytest.approx(2.0)
    assert ft["before_reads_seconds"] == pytest.approx(0.02)
    assert ft["after_reads_seconds"] == pytest.approx(0.03)
    assert ft["note"] == (
        "reads alone 2.00 GB/s (80% of limit), 20 ms before the first, 30 ms after the last (medians)"
    )
    assert "reads_gbps" not in rows["fastsafetensors"] and "note" not in rows["fastsafetensors"]


def test_summary_pairs_the_rounds() -> None:
    """Ours against each peer round by round (the same repeat): the median of the peer's time over ours
    and how many rounds ours won; rounds missing a run are left out, and fewer than three say nothing."""

    def run(loader: str, repeat: int, seconds: float, status: str = "ok") -> dict[str, Any]:
        out = {"loader": loader, "scenario": "cold", "repeat": repeat, "status": status}
        return out | ({"seconds": seconds} if status != "error" else {"error": "boom"})

    report = {
        "checkpoint": {"bytes": 1_000_000_000},
        "options": {"device": "cuda"},
        "limits": {},
        "runs": [run("flashtensors", i, s) for i, s in enumerate((1.0, 2.0, 1.0, 1.0))]
        # rounds: 1.2x, 0.9x, 1.1x; the fourth failed and is left out
        + [run("fastsafetensors", i, s) for i, s in enumerate((1.2, 1.8, 1.1))]
        + [run("fastsafetensors", 3, 0.0, "error")]
        + [run("runai", i, 1.5) for i in range(2)],  # two rounds only
    }
    rows = {r["loader"]: r for r in summarize(report)}
    ft = rows["flashtensors"]
    assert ft["paired"] == {"fastsafetensors": {"median": pytest.approx(1.1), "faster": 2, "rounds": 3}}
    assert ft["note"].endswith(
        "round by round, the peer's time over ours (median): fastsafetensors 1.10x (ours faster in 2 of 3)"
    )
    assert "paired" not in rows["fastsafetensors"]


def test_cache_helpers(ckpt_dir: Path) -> None:
    files = sorted(ckpt_dir.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    assert drop_cache(files, "fadvise") == "fadvise"
    try:
        assert parallel_read(chunks(files), 4, direct=True) == total
        got, seconds = timed_parallel_read(chunks(files), 2, direct=True)
        assert got == total and seconds > 0
    except OSError as exc:  # a filesystem without O_DIRECT (tmpfs) refuses the open
        assert exc.errno == errno.EINVAL
    assert warm_cache(files, threads=3) == total
    assert sum(c[2] for c in chunks(files, limit=total // 2)) <= total // 2
    with pytest.raises(ConfigError, match="cache-drop"):
        drop_cache(files, "sometimes")


def test_bad_options(ckpt_dir: Path) -> None:
    ckpt = resolve_checkpoint(ckpt_dir)
    with pytest.raises(ConfigError, match="unknown loader"):
        run_bench(ckpt, RunOptions(loaders=["torchload"], device="cpu"))
    with pytest.raises(ConfigError, match="unknown scenario"):
        run_bench(ckpt, RunOptions(scenarios=["lukewarm"], device="cpu"))
    with pytest.raises(ConfigError, match="--start must be one of forkserver, exec"):
        run_bench(ckpt, RunOptions(start="spawn", device="cpu"))
    with pytest.raises(ConfigError, match="--timeout must be positive"):
        run_bench(ckpt, RunOptions(timeout=0, device="cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA") as info:
            run_bench(ckpt, RunOptions(device="cuda"))
        assert "--device cpu" in info.value.hint


@pytest.mark.parametrize("scenario", ["cold", "warm", "hot"])
def test_flashtensors_runs_record_the_read_path_of_each_file(ckpt_dir: Path, scenario: str) -> None:
    """So a surprising figure can be traced to the path the engine took (the peers record nothing)."""
    record = worker.run_load(_spec(ckpt_dir, "flashtensors", scenario))
    files = sorted(p.name for p in ckpt_dir.glob("*.safetensors"))
    assert sorted(record["read_paths"]) == files
    assert set(record["read_paths"].values()) <= {"direct", "buffered"}  # the CPU paths
    if scenario != "cold":  # in the page cache: a memcpy, whatever residency the cold drop left
        assert set(record["read_paths"].values()) == {"buffered"}
    began, ended = record["reads"]  # the CPU paths read files: when those reads ran
    assert 0 <= began <= ended <= record["seconds"]
    peer = worker.run_load(_spec(ckpt_dir, "safetensors", scenario))
    assert "read_paths" not in peer and "reads" not in peer


@pytest.mark.parametrize("fill", ["keep", "fresh"])
def test_warm_fill_keeps_or_rereads_the_page_cache(ckpt_dir: Path, fill: str) -> None:
    from helpers.compare import drop_from_cache

    files = sorted(ckpt_dir.glob("*.safetensors"))
    warm_cache(files)  # resident, as a previous run would leave them
    if fill == "fresh" and not drop_from_cache(files[0]):
        pytest.skip("this filesystem does not let a file's pages be evicted")
    warm_cache(files)
    spec = dict(_spec(ckpt_dir, "flashtensors", "warm"), warm_fill=fill)
    record = worker.run_load(spec)
    total = sum(f.stat().st_size for f in files)
    assert record["warm_read_bytes"] == (total if fill == "fresh" else 0)
    assert record["cache"] == ("warm, re-read sequentially" if fill == "fresh" else "warm")
    assert record["checksums"] == resolve_checkpoint(ckpt_dir).reference


def test_bad_warm_fill(ckpt_dir: Path) -> None:
    with pytest.raises(ConfigError, match="--warm-fill"):
        RunOptions(device="cpu", warm_fill="sometimes").validate()


def test_bad_hot_memory(ckpt_dir: Path) -> None:
    with pytest.raises(ConfigError, match="--hot-memory"):
        RunOptions(device="cpu", hot_memory="recycled").validate()


@pytest.mark.parametrize("memory", ["fresh", "reused"])
def test_header_says_how_hot_loads_got_device_memory(memory: str) -> None:
    from flashtensors.bench.report import format_header

    run = {"scenario": "hot", "loader": "flashtensors", "status": "ok", "hot_memory": "said by the worker"}
    report: dict[str, Any] = {
        "checkpoint": {"directory": "/m", "bytes": 1, "files": ["/m/a.safetensors"], "tensors": 1},
        "options": {"device": "cuda", "repeat": 3, "hot_memory": memory},
        "runs": [run],
        "limits": {},
    }
    line = [x for x in format_header(report).splitlines() if x.startswith("hot device memory")]
    assert line == [
        "hot device memory: "
        + (
            "fresh from the driver, torch's cache emptied before each timed load (--hot-memory fresh)"
            if memory == "fresh"
            else "reused from torch's cache, where the untimed load freed it (--hot-memory reused)"
        )
    ]
    run.pop("hot_memory")  # CPU runs: no device memory to speak of, no line
    assert not [x for x in format_header(report).splitlines() if x.startswith("hot device memory")]


def test_header_names_the_disks_best_threads_and_request_size() -> None:
    """The disk limit's best shape (threads x bytes per request) in the header, for the start-of-run
    figure and the interleaved reads; files from before request sizes were tried name threads only."""
    from flashtensors.bench.report import format_header

    report: dict[str, Any] = {
        "checkpoint": {"directory": "/m", "bytes": 1, "files": ["/m/a.safetensors"], "tensors": 1},
        "options": {"device": "cuda", "repeat": 3},
        "runs": [],
        "limits": {
            "disk": {
                "gbps": 2.16,
                "method": "O_DIRECT",
                "threads": {"1": 1.7, "4": 1.6, "8": 1.78, "16": 1.6},
                "shapes": {"1x16M": 1.7, "4x16M": 1.6, "8x16M": 1.78, "16x16M": 1.6, "16x512K": 2.16},
                "best_threads": 16,
                "best_request": 512 * 1024,
            },
            "disk_interleaved": {
                "gbps": 2.1,
                "runs": [2.0, 2.1, 2.2],
                "threads": 16,
                "request": 512 * 1024,
                "method": "O_DIRECT",
            },
        },
    }
    header = format_header(report)
    assert "limits (measured first): disk 2.16 GB/s (16x512K)" in header
    assert "disk between the cold runs: median 2.10 GB/s (2.00 2.10 2.20; 16x512K, O_DIRECT)" in header
    for key in ("shapes", "best_request"):
        del report["limits"]["disk"][key]
    del report["limits"]["disk_interleaved"]["request"]
    header = format_header(report)
    assert "disk 2.16 GB/s (8 threads)" in header and "(2.00 2.10 2.20; 16 threads, O_DIRECT)" in header


def test_chunks_by_request_size(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(bytes(3 * 4096 + 10))
    assert chunks([f], size=8192) == [(str(f), 0, 8192), (str(f), 8192, 4096 + 10)]
    assert chunks([f], limit=8192, size=4096) == [(str(f), 0, 4096), (str(f), 4096, 4096)]
    assert chunks([f]) == [(str(f), 0, 3 * 4096 + 10)]
    for bad in (6000, 32 * 1024**2):
        with pytest.raises(ValueError, match="multiple of 4096"):
            chunks([f], size=bad)


def test_no_limits_still_describes_the_machine(ckpt_dir: Path) -> None:
    """Every published figure needs its card, torch and date, limits or not."""
    options = RunOptions(loaders=["flashtensors"], scenarios=["warm"], repeat=1, device="cpu", limits=False)
    report = run_bench(resolve_checkpoint(ckpt_dir), options)
    assert report["limits"] == {} and report["disk_runs"] == []
    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["date"]
    assert report["machine"]["device"] == "cpu"


def test_e2e_on_cpu_is_primed_once_then_timed_per_loader(ckpt_dir: Path) -> None:
    """e2e: one untimed priming run first (the machine's one-off costs), then each loader builds the model
    and generates one token; the weights it generated with are the checkpoint's."""
    options = RunOptions(
        loaders=["flashtensors", "transformers"], scenarios=["e2e"], repeat=1, device="cpu", limits=False
    )
    ckpt = resolve_checkpoint(ckpt_dir)
    report = run_bench(ckpt, options)
    prime = report["workers"]["e2e_prime"]
    assert "error" not in prime and prime["wall_seconds"] >= prime["seconds"] > 0
    runs = report["runs"]
    assert sorted(r["loader"] for r in runs) == ["flashtensors", "transformers"]
    for r in runs:
        assert r["status"] == "ok", r
        assert r["checksums"] == ckpt.reference, r["loader"]
        assert r["generated_tokens"] == 1
        assert r["seconds"] == pytest.approx(r["load_seconds"] + r["first_token_seconds"])
    ours = next(r for r in runs if r["loader"] == "flashtensors")
    assert sorted(ours["read_paths"]) == sorted(f.name for f in ckpt.files)
    assert set(ours["read_paths"].values()) == {"buffered"}  # cached files, on a CPU
    assert "read_paths" not in next(r for r in runs if r["loader"] == "transformers")
    from flashtensors.bench.report import format_header

    header = format_header(report).splitlines()
    assert (
        f"e2e: primed by one untimed run of a one-layer copy of the model before the first loader "
        f"({prime['seconds']:.2f} s)" in header
    )


@pytest.mark.parametrize("scenario", ["cold", "warm", "hot"])
def test_the_clocks_page_touch_is_warmed_before_the_clock(
    ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch, scenario: str
) -> None:
    """On CPU, resident()'s sum runs once over memory no loader returned, after the cache is put in the
    scenario's state and before the timed load: its first use after a cache drop read torch's code
    back from disk on the clock (93-112 ms on the CPU machine)."""
    events: list[str] = []
    real_warm, real_load = worker.warm_resident, loaders_mod.LOADERS["safetensors"].load
    real_drop = worker.drop_cache

    def drop(*args: Any, **kwargs: Any) -> str:
        events.append("drop")
        return real_drop(*args, **kwargs)

    def warm(device: str) -> None:
        events.append(f"warm {device}")
        real_warm(device)

    def load(target: Any, device: str) -> Any:
        events.append("load")
        return real_load(target, device)

    monkeypatch.setattr(worker, "drop_cache", drop)
    monkeypatch.setattr(worker, "warm_resident", warm)
    monkeypatch.setitem(
        loaders_mod.LOADERS, "safetensors", loaders_mod.Loader("safetensors", (), ("cpu",), load, "patched")
    )
    record = worker.run_load(_spec(ckpt_dir, "safetensors", scenario))
    assert record["checksums"] == resolve_checkpoint(ckpt_dir).reference
    timed = events[events.index("warm cpu") :]
    assert timed == ["warm cpu", "load"]  # the hot scenario's untimed load came before the warm-up
    if scenario == "cold":
        assert events[0] == "drop"
