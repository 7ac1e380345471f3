"""`flash bench run`: limits first, then every (scenario, repeat, loader) in a fresh worker process.

Runs are interleaved (every loader once, then the next repeat), and the order rotates: repeat r starts at
loader r mod n of the list (``--loaders`` order), so no loader always runs first or last. That matters
here: the lent machine's virtual disk reads the same blocks faster each time they are read again
(1.41 -> 1.85 -> 2.13 GB/s in one minute), so a fixed order would favour whoever runs last.

For the same reason, each cold repeat also holds one raw read of the files (``disk_runs``: cache dropped,
with the threads and request size the limits step found best), as one more member of the rotation;
the cold ceiling is the median of those reads, not the single figure taken at the start.

Each run's checksums are compared with digests read straight from the files; a mismatch marks it FAIL.
Workers start from a pre-imported, CUDA-free fork server (see :class:`flashtensors.bench.launcher.Launcher`).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flashtensors.bench.checksum import compare_checksums
from flashtensors.bench.launcher import PRELOAD, Launcher
from flashtensors.bench.limits import shape_name
from flashtensors.bench.loaders import unavailable
from flashtensors.bench.options import BenchCheckpoint, RunOptions
from flashtensors.errors import DeviceError

CLI_MODULE = "flashtensors.cli.app"
DISK = "disk (O_DIRECT)"  # the raw read interleaved with the cold runs, in progress lines and disk_runs
# transformers imports lazily: the fork server imports what a load and a generate touch, or each run
# that uses transformers pays ~2.5 s of imports (the model's modeling module is added per checkpoint).
PRELOAD_TRANSFORMERS = (
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "flashtensors.models",
    "flashtensors.backends.transformers_backend",
)


def _check_device(device: str) -> None:
    if device == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        raise DeviceError(
            f"--device {device}: this torch ({torch.__version__}) sees no CUDA device",
            hint="use `flash bench run DIR --device cpu`, or run on a machine with a GPU",
        )


def rotation(members: Sequence[str], repeat: int) -> list[str]:
    """The order of one repeat: ``members`` rotated so that repeat ``r`` starts at member ``r mod n``.

    Example:
        >>> rotation(["a", "b", "c"], 1)
        ['b', 'c', 'a']
    """
    k = repeat % len(members) if members else 0
    return [*members[k:], *members[:k]]


def judge_run(record: dict[str, Any], ckpt: BenchCheckpoint) -> None:
    """Set ``status`` (ok, FAIL, error) and ``mismatches`` of a finished run record, in place."""
    if record.get("error"):
        record["status"] = "error"
        return
    if record.get("checksums") is None:
        record["status"] = "ok"
        record["checksum_note"] = "no state dict exposed: bytes not checked"
        return
    bad = compare_checksums(ckpt.reference, record["checksums"])
    record["mismatches"] = [str(m) for m in bad]
    record["status"] = "FAIL" if bad else "ok"


# Not the engine's speed: where the store lives, the daemon's address, tracebacks.
_NOT_TUNING = ("FLASH_HOME", "FLASH_HOST", "FLASH_DEBUG")


def engine_settings() -> dict[str, str]:
    """The FLASH_* variables set for this run (the workers inherit them), as given: a run with
    ``FLASH_RING_SIZE=512M`` is then told apart from one with the defaults (``flash bench pool``)."""
    from flashtensors.config import VARIABLES

    return {v.env: os.environ[v.env] for v in VARIABLES if v.env not in _NOT_TUNING and os.environ.get(v.env)}


def run_bench(
    ckpt: BenchCheckpoint,
    options: RunOptions,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure limits and every (scenario, repeat, loader); return the raw report.

    Args:
        ckpt: from :func:`resolve_checkpoint`.
        options: what to run.
        progress: called with one line per finished step (the CLI prints it on stderr).

    Returns:
        ``{"checkpoint", "options", "settings", "workers", "machine", "limits", "runs", "disk_runs",
        "skipped"}``,
        which :mod:`flashtensors.bench.report` turns into the table. A worker that crashes or times out
        is that run's ``error``, never an exception here.

    Raises:
        ConfigError: bad options.
        DeviceError: ``cuda`` asked for and none is visible.
    """
    options.validate()
    _check_device(options.device)
    say = progress or (lambda line: None)
    base = {
        "directory": str(ckpt.directory),
        "files": [str(f) for f in ckpt.files],
        "device": options.device,
        "cache_drop": options.cache_drop,
        "warm_fill": options.warm_fill,
        "hot_memory": options.hot_memory,
    }
    report: dict[str, Any] = {
        "checkpoint": _describe(ckpt),
        "options": asdict(options),
        "settings": engine_settings(),
        "workers": {},
        "machine": {},
        "limits": {},
        "runs": [],
        "disk_runs": [],
        "skipped": [],
    }
    plan: dict[str, list[str]] = {}
    for scenario in options.scenarios:
        plan[scenario] = []
        for loader in dict.fromkeys(options.loaders):
            why = unavailable(loader, options.device, scenario)
            if why:
                report["skipped"].append({"loader": loader, "scenario": scenario, "note": why})
                say(f"skip {loader} {scenario}: {why}")
            else:
                plan[scenario].append(loader)
    launcher = _start_workers(options, _preload(plan, ckpt.directory), report, say)
    try:
        if options.limits:
            shape = _measure_limits(launcher, base, options, report, say)
        else:  # the card, torch and date still belong with every figure
            shape = None
            got = launcher.run(dict(base, kind="machine"), options.timeout)
            report["machine"] = got.get("machine", {})
        if shape is not None and "cold" in plan:
            plan["cold"] = [*plan["cold"], DISK]
        if plan.get("e2e"):
            _prime(launcher, base, options, report, say)
        steps = [
            (scenario, rep, member)
            for scenario, members in plan.items()
            for rep in range(options.repeat)
            for member in rotation(members, rep)
        ]
        for done, (scenario, rep, member) in enumerate(steps, 1):
            if member == DISK:
                assert shape is not None  # DISK joins the plan only with a disk figure
                spec = dict(base, kind="disk", threads=shape[0], request=shape[1])
            else:
                spec = dict(base, kind="load", loader=member, scenario=scenario, names=list(ckpt.names))
            record = launcher.run(spec, options.timeout)
            record.update(scenario=scenario, repeat=rep, order=done)
            if member == DISK:
                record["status"] = "error" if record.get("error") else "ok"
                report["disk_runs"].append(record)
            else:
                record["loader"] = member
                judge_run(record, ckpt)
                report["runs"].append(record)
            say(_progress_line(done, len(steps), record, ckpt.nbytes))
    finally:
        launcher.close()
    read = [r for r in report["disk_runs"] if r["status"] == "ok"]
    if read:
        report["limits"]["disk_interleaved"] = {
            "gbps": statistics.median(r["gbps"] for r in read),
            "runs": [r["gbps"] for r in read],
            "threads": read[0]["threads"],
            "request": read[0]["request"],
            "method": read[0]["method"],
        }
    return report


def _start_workers(
    options: RunOptions, preload: tuple[str, ...], report: dict[str, Any], say: Callable[[str], None]
) -> Launcher:
    """A launcher for the runs, its fork server started; ``exec`` where the fork server is unusable."""
    launcher = Launcher(options.start, preload)
    report["workers"] = launcher.warm_up()
    if report["workers"].get("error"):
        launcher.close()
        say(f"fork server unusable ({report['workers']['error']}); starting workers with python -m")
        report["workers"] = {"start": "exec", "fallback_from": report["workers"]}
        return Launcher("exec")
    if options.start == "forkserver":
        seconds = report["workers"]["startup_seconds"]
        say(f"workers fork from one server that imported torch once ({seconds:.1f} s)")
    return launcher


def _preload(plan: dict[str, list[str]], directory: Path) -> tuple[str, ...]:
    """What the fork server imports: always torch and flashtensors; transformers (and the model's
    modeling module) when a run needs it."""
    modules: tuple[str, ...] = PRELOAD
    if plan.get("e2e") or "transformers" in {loader for members in plan.values() for loader in members}:
        try:
            kind = str(json.loads((directory / "config.json").read_text())["model_type"]).replace("-", "_")
            model: tuple[str, ...] = (f"transformers.models.{kind}.modeling_{kind}",)
        except (OSError, ValueError, KeyError, TypeError):
            model = ()  # the run itself will say what is wrong with the config
        modules += PRELOAD_TRANSFORMERS + model
    # Each child re-runs the parent's __main__ script (multiprocessing does, so that functions defined
    # there unpickle); under `flash` that script imports the CLI, 40 ms a child unless the server has.
    return modules + (CLI_MODULE,) if CLI_MODULE in sys.modules else modules


def _measure_limits(
    launcher: Launcher,
    base: dict[str, Any],
    options: RunOptions,
    report: dict[str, Any],
    say: Callable[[str], None],
) -> tuple[int, int] | None:
    """Run the limits step into ``report``; returns the disk's best (threads, bytes per request), or
    None where there is no disk figure."""
    say(
        "measuring limits (disk O_DIRECT, page cache, memcpy"
        + (", pinned H2D, pinning the page cache)" if options.device != "cpu" else ")")
    )
    spec = dict(
        base,
        kind="limits",
        limit_bytes=options.limit_bytes,
        h2d_bytes=options.h2d_bytes,
        memcpy_bytes=options.memcpy_bytes,
    )
    got = launcher.run(spec, options.timeout)
    if got.get("error"):
        report["limits"] = {"error": got["error"]}
        say(f"limits failed: {got['error']}")
        return None
    report["limits"], report["machine"] = got["limits"], got["machine"]
    report["workers"]["limits_wall_seconds"] = got["wall_seconds"]
    disk = report["limits"].get("disk", {})
    if disk.get("best_threads") is None:
        return None
    return int(disk["best_threads"]), int(disk["best_request"])


def _prime(
    launcher: Launcher,
    base: dict[str, Any],
    options: RunOptions,
    report: dict[str, Any],
    say: Callable[[str], None],
) -> None:
    """Before the e2e runs: one untimed process runs a small copy of the model (worker ``run_prime``),
    so that the machine's one-off costs do not land on whichever loader runs first."""
    say("priming e2e: one untimed run of a small copy of the model (GPU libraries, kernel caches)")
    got = launcher.run(dict(base, kind="prime"), options.timeout)
    report["workers"]["e2e_prime"] = {"wall_seconds": got["wall_seconds"]}
    if got.get("error"):
        report["workers"]["e2e_prime"]["error"] = got["error"]
        say(f"priming failed ({got['error']}); the first e2e run may pay for it")
    else:
        report["workers"]["e2e_prime"]["seconds"] = got["seconds"]


def _describe(ckpt: BenchCheckpoint) -> dict[str, Any]:
    out: dict[str, Any] = {
        "directory": str(ckpt.directory),
        "files": [str(f) for f in ckpt.files],
        "bytes": ckpt.nbytes,
        "tensors": ckpt.tensors,
        "checked_tensors": list(ckpt.names),
        "reference_checksums": ckpt.reference,
    }
    config = ckpt.directory / "config.json"
    if config.is_file():
        try:
            shape = json.loads(config.read_text()).get("flashtensors_bench_shape")
        except (OSError, ValueError):
            shape = None
        if shape:
            out["shape"] = shape
    return out


def _progress_line(done: int, total: int, record: dict[str, Any], nbytes: int) -> str:
    name = record.get("loader", DISK)
    head = f"[{done:>3}/{total}] {record['scenario']:<5} {name:<17} #{record['repeat'] + 1}"
    if record["status"] == "error":
        return f"{head}  error: {record['error']}"
    seconds = record["seconds"]
    gbps = (nbytes if "loader" in record else record["bytes"]) / seconds / 1e9
    line = f"{head}  {seconds:8.3f} s  {gbps:7.2f} GB/s  {record['status']}"
    if "loader" not in record:
        line += f"  ({shape_name(record['threads'], record['request'])}, {record['method']})"
    if record.get("read_paths"):  # flashtensors: which read path its files took
        line += "  (" + ", ".join(sorted(set(record["read_paths"].values())))
        if record.get("reads"):
            began, ended = record["reads"]
            line += f"; reads {1e3 * began:.0f}-{1e3 * ended:.0f} ms"
        line += ")"
    if record["status"] == "FAIL":
        line += "  CHECKSUM MISMATCH: " + "; ".join(record["mismatches"])
    return line + f"  [wall {record['wall_seconds']:.2f} s]"
