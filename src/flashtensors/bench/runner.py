"""`flash bench run`: limits first, then every (scenario, repeat, loader) in a fresh worker process.

Runs are interleaved (all loaders of one repeat, then the next repeat), so a drift of the machine during
the run touches every loader alike. Each run's checksums are compared with digests read straight from
the files; a mismatch marks the run FAIL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flashtensors.bench.cache import CACHE_DROP_METHODS
from flashtensors.bench.checksum import compare_checksums, pick_names, reference_digests
from flashtensors.bench.loaders import LOADERS, unavailable
from flashtensors.bench.worker import RESULT_PREFIX
from flashtensors.errors import ConfigError, DeviceError
from flashtensors.format.safetensors import FileHeader, read_header

SCENARIOS = ("cold", "warm", "hot", "e2e")
GiB = 1024**3


@dataclass(frozen=True)
class BenchCheckpoint:
    """The checkpoint under test: its folder, files, headers, size and reference digests."""

    directory: Path
    files: tuple[Path, ...]
    headers: tuple[FileHeader, ...]
    nbytes: int
    names: tuple[str, ...]
    reference: dict[str, str]

    @property
    def tensors(self) -> int:
        return sum(len(h.tensors) for h in self.headers)


@dataclass
class RunOptions:
    """What `flash bench run` measures and how."""

    loaders: list[str] = field(default_factory=lambda: ["flashtensors", "safetensors", "safetensors-mmap"])
    scenarios: list[str] = field(default_factory=lambda: ["cold", "warm", "hot"])
    repeat: int = 3
    device: str = "cuda"
    cache_drop: str = "auto"
    limits: bool = True
    limit_bytes: int = 8 * GiB
    h2d_bytes: int = 2 * GiB
    memcpy_bytes: int = GiB
    timeout: float = 1800.0

    def validate(self) -> RunOptions:
        bad = [name for name in self.loaders if name not in LOADERS]
        if bad:
            raise ConfigError(
                f"unknown loader(s) {', '.join(bad)}; known: {', '.join(LOADERS)}",
                hint="run `flash bench run --help`",
            )
        bad = [s for s in self.scenarios if s not in SCENARIOS]
        if bad:
            raise ConfigError(
                f"unknown scenario(s) {', '.join(bad)}; known: {', '.join(SCENARIOS)}",
                hint="run `flash bench run --help`",
            )
        if not self.loaders or not self.scenarios:
            raise ConfigError(
                "name at least one loader and one scenario", hint="run `flash bench run --help`"
            )
        if self.repeat < 1:
            raise ConfigError(f"--repeat must be at least 1, not {self.repeat}")
        if self.cache_drop not in CACHE_DROP_METHODS:
            raise ConfigError(f"--cache-drop must be one of {', '.join(CACHE_DROP_METHODS)}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"--device must be cpu, cuda or cuda:N, not {self.device!r}")
        return self


def resolve_checkpoint(dir_or_model: str | os.PathLike[str]) -> BenchCheckpoint:
    """Find the safetensors files of a folder, a file or a model id of the local store, and hash the
    tensors every run is checked against.

    Raises:
        ModelNotFound: nothing usable at that path or id.
        FormatError: a file is not valid safetensors.
    """
    from flashtensors.engine.plan import resolve_files

    files = tuple(Path(f) for f in resolve_files(dir_or_model))
    directory = Path(dir_or_model) if Path(dir_or_model).is_dir() else files[0].parent
    headers = tuple(read_header(f) for f in files)
    names = pick_names(headers)
    return BenchCheckpoint(
        directory=directory,
        files=files,
        headers=headers,
        nbytes=sum(h.data_size for h in headers),
        names=tuple(names),
        reference=reference_digests(headers, names),
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


def spawn(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one worker and return its result record (``error`` set when it failed or crashed)."""
    cmd = [sys.executable, "-m", "flashtensors.bench.worker", json.dumps(spec)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = " | ".join(proc.stderr.strip().splitlines()[-5:])
    return {"error": f"worker exited with status {proc.returncode} and no result: {tail}"}


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
        ``{"checkpoint", "options", "machine", "limits", "runs", "skipped"}``, which
        :mod:`flashtensors.bench.report` turns into the table.

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
    }
    report: dict[str, Any] = {
        "checkpoint": _describe(ckpt),
        "options": asdict(options),
        "machine": {},
        "limits": {},
        "runs": [],
        "skipped": [],
    }
    if options.limits:
        say(
            "measuring limits (disk O_DIRECT, page cache, memcpy"
            + (", pinned H2D)" if options.device != "cpu" else ")")
        )
        spec = dict(
            base,
            kind="limits",
            limit_bytes=options.limit_bytes,
            h2d_bytes=options.h2d_bytes,
            memcpy_bytes=options.memcpy_bytes,
        )
        got = spawn(spec, options.timeout)
        if got.get("error"):
            report["limits"] = {"error": got["error"]}
            say(f"limits failed: {got['error']}")
        else:
            report["limits"], report["machine"] = got["limits"], got["machine"]
    plan: list[tuple[str, str]] = []
    for scenario in options.scenarios:
        for loader in options.loaders:
            why = unavailable(loader, options.device, scenario)
            if why:
                report["skipped"].append({"loader": loader, "scenario": scenario, "note": why})
                say(f"skip {loader} {scenario}: {why}")
            else:
                plan.append((scenario, loader))
    total, done = len(plan) * options.repeat, 0
    for scenario in options.scenarios:
        for rep in range(options.repeat):
            for sc, loader in plan:
                if sc != scenario:
                    continue
                spec = dict(base, kind="load", loader=loader, scenario=scenario, names=list(ckpt.names))
                record = spawn(spec, options.timeout)
                record.update(loader=loader, scenario=scenario, repeat=rep)
                judge_run(record, ckpt)
                report["runs"].append(record)
                done += 1
                say(_progress_line(done, total, record, ckpt.nbytes))
    return report


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
    head = f"[{done:>3}/{total}] {record['scenario']:<5} {record['loader']:<17} #{record['repeat'] + 1}"
    if record["status"] == "error":
        return f"{head}  error: {record['error']}"
    seconds = record["seconds"]
    line = f"{head}  {seconds:8.3f} s  {nbytes / seconds / 1e9:7.2f} GB/s  {record['status']}"
    if record["status"] == "FAIL":
        line += "  CHECKSUM MISMATCH: " + "; ".join(record["mismatches"])
    return line


def failures(report: dict[str, Any]) -> list[str]:
    """One line per run whose bytes differ from the checkpoint's (empty: every check passed)."""
    return [
        f"{r['loader']} {r['scenario']} #{r['repeat'] + 1}: " + "; ".join(r["mismatches"])
        for r in report["runs"]
        if r.get("status") == "FAIL"
    ]


def parse_list(text: str, known: Sequence[str], what: str) -> list[str]:
    """Split a comma list (``all`` = every known name)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if items == ["all"]:
        return list(known)
    bad = [t for t in items if t not in known]
    if bad:
        raise ConfigError(
            f"unknown {what} {', '.join(bad)}; known: {', '.join(known)}", hint="run `flash bench run --help`"
        )
    return items
