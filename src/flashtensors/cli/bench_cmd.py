"""`flash bench make`, `flash bench run` and `flash bench pool`: reproducible load benchmarks (protocol:
BENCH.md)."""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from flashtensors.config import _parse_size
from flashtensors.errors import ConfigError

bench_app = typer.Typer(
    name="bench",
    help="Measure loads against the hardware's limits and the peers (cold, warm, hot, e2e).",
    no_args_is_help=True,
)

_Dim = Annotated[int | None, typer.Option(help="override the shape's value", show_default=False)]


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


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


@bench_app.command("make")
def make_cmd(
    shape: Annotated[
        str, typer.Argument(help="qwen3-0.6b, qwen3-4b, qwen3-8b, qwen3-14b, qwen3-32b or custom")
    ],
    directory: Annotated[Path, typer.Argument(help="where to write the checkpoint (empty or missing)")],
    layers: _Dim = None,
    hidden: _Dim = None,
    intermediate: _Dim = None,
    heads: _Dim = None,
    kv_heads: _Dim = None,
    head_dim: _Dim = None,
    vocab: _Dim = None,
    tied: Annotated[
        bool | None, typer.Option("--tied/--untied", help="tie lm_head to the embeddings")
    ] = None,
    shard_size: Annotated[str, typer.Option(help="bytes per shard (e.g. 4G, 512M)")] = "4G",
    dtype: Annotated[str, typer.Option(help="bf16, fp16 or fp32")] = "bf16",
    seed: Annotated[int, typer.Option(help="the same seed writes the same bytes")] = 0,
    force: Annotated[bool, typer.Option(help="overwrite checkpoint files already in DIRECTORY")] = False,
) -> None:
    """Write a synthetic HF-style Qwen3 checkpoint (random weights, real shapes) for benchmarks."""
    from flashtensors.bench.make import make_checkpoint
    from flashtensors.bench.shapes import resolve_shape

    spec = resolve_shape(
        shape,
        layers=layers,
        hidden=hidden,
        intermediate=intermediate,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        tied=tied,
    )
    _err(f"writing {spec.name} ({spec.numel() / 1e6:,.1f} M parameters, {dtype}) to {directory}")
    t0 = time.perf_counter()
    made = make_checkpoint(
        spec,
        directory,
        shard_size=_parse_size(shard_size),
        dtype=dtype,
        seed=seed,
        force=force,
        progress=True,
    )
    seconds = time.perf_counter() - t0
    rate = made.nbytes / made.write_seconds / 1e9 if made.write_seconds > 0 else 0.0
    print(
        f"wrote {made.path}: {spec.name}, {made.tensors} tensors, {len(made.files)} files, "
        f"{made.nbytes / 1e9:.2f} GB in {seconds:.1f} s (shards written at {rate:.2f} GB/s)"
    )


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@bench_app.command("run")
def run_cmd(
    checkpoint: Annotated[str, typer.Argument(help="a checkpoint folder, a safetensors file, or a model id")],
    scenarios: Annotated[str, typer.Option(help="comma list of cold, warm, hot, e2e")] = "cold,warm,hot,e2e",
    loaders: Annotated[
        str,
        typer.Option(
            help="comma list (or all) of flashtensors, safetensors, safetensors-mmap, transformers, "
            "fastsafetensors, runai, instanttensor; peers not installed are skipped"
        ),
    ] = "all",
    repeat: Annotated[int, typer.Option(help="runs per (loader, scenario); the table shows the median")] = 3,
    device: Annotated[str, typer.Option(help="cuda, cuda:N, cpu, or auto (cuda when there is one)")] = "auto",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="write every raw figure to this file")
    ] = None,
    markdown: Annotated[bool, typer.Option(help="print the table in Markdown (for BENCHMARKS.md)")] = False,
    cache_drop: Annotated[
        str, typer.Option(help="cold cache: auto, drop_caches (root) or fadvise (per file)")
    ] = "auto",
    warm_fill: Annotated[
        str,
        typer.Option(
            help="warm and hot: keep (pages already in the page cache stay as the previous run left "
            "them) or fresh (evict the files and read them once, sequentially, before every run)"
        ),
    ] = "keep",
    hot_memory: Annotated[
        str,
        typer.Option(
            help="hot on a GPU: fresh (empty torch's cache before the timed load, so it allocates from "
            "the driver) or reused (it takes the untimed load's memory back from torch's cache)"
        ),
    ] = "fresh",
    limits: Annotated[bool, typer.Option(help="measure disk, page cache, memcpy and PCIe first")] = True,
    limit_bytes: Annotated[str, typer.Option(help="bytes read per disk/page-cache measurement")] = "8G",
    h2d_bytes: Annotated[str, typer.Option(help="size of the pinned host->GPU copy")] = "2G",
    memcpy_bytes: Annotated[str, typer.Option(help="size of the host memcpy")] = "1G",
    timeout: Annotated[
        float, typer.Option(help="seconds allowed to one worker process; it is killed after that")
    ] = 1800.0,
    start: Annotated[
        str,
        typer.Option(
            help="how each fresh worker process starts: forkserver (forked from a server that imported "
            "torch once, CUDA never initialized) or exec (python -m flashtensors.bench.worker)"
        ),
    ] = "forkserver",
) -> None:
    """Time every loader in every scenario, each run in a fresh process, with the limits of this machine.

    The table goes to stdout and progress to stderr; --json keeps every raw figure.

    Each repeat rotates the loader order, and cold repeats also time a raw disk read between the loads.

    If a loader returns bytes that differ from the files, its run is marked FAIL and the exit status is 1.
    """
    from flashtensors.bench.loaders import LOADERS
    from flashtensors.bench.options import SCENARIOS, RunOptions, resolve_checkpoint
    from flashtensors.bench.report import failures, format_header, format_table, summarize, write_json
    from flashtensors.bench.runner import run_bench
    from flashtensors.errors import IntegrityError

    options = RunOptions(
        loaders=parse_list(loaders, list(LOADERS), "loader(s)"),
        scenarios=parse_list(scenarios, SCENARIOS, "scenario(s)"),
        repeat=repeat,
        device=_default_device() if device == "auto" else device,
        cache_drop=cache_drop,
        warm_fill=warm_fill,
        hot_memory=hot_memory,
        limits=limits,
        limit_bytes=_parse_size(limit_bytes),
        h2d_bytes=_parse_size(h2d_bytes),
        memcpy_bytes=_parse_size(memcpy_bytes),
        timeout=timeout,
        start=start,
    ).validate()
    ckpt = resolve_checkpoint(checkpoint)
    _err(
        f"bench {ckpt.directory}: {ckpt.nbytes / 1e9:.2f} GB in {len(ckpt.files)} files, on {options.device}"
    )
    report = run_bench(ckpt, options, progress=_err)
    report["command"] = shlex.join(
        ["flash", "bench", "run", checkpoint, "--scenarios", ",".join(options.scenarios)]
        + ["--loaders", ",".join(options.loaders), "--repeat", str(repeat), "--device", options.device]
        + ["--cache-drop", cache_drop, "--warm-fill", warm_fill, "--hot-memory", hot_memory]
        + ["--start", start]
        + ([] if limits else ["--no-limits"])
    )
    rows = summarize(report)
    report["summary"] = rows
    report["failures"] = failures(report)
    print(format_header(report))
    print()
    print(format_table(rows, markdown=markdown))
    if json_out is not None:
        write_json(json_out, report)
        _err(f"raw figures written to {json_out}")
    if report["failures"]:
        print("\nFAIL: checksum mismatch", *report["failures"], sep="\n  ")
        raise IntegrityError(
            f"{len(report['failures'])} run(s) returned bytes that differ from the checkpoint files",
            hint="see the FAIL lines above; rerun one loader with `flash bench run DIR --loaders NAME`",
        )


def read_report(path: Path) -> dict[str, Any]:
    """A `flash bench run --json` file, or a clear error saying what is wrong with it."""
    hint = "pass files written by `flash bench run ... --json FILE`"
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no such file: {path}", hint=hint) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not a bench report: {exc}", hint=hint) from None
    if not isinstance(report, dict) or not {"checkpoint", "runs"} <= report.keys():
        raise ConfigError(f"{path} is not a bench report (no checkpoint or runs)", hint=hint)
    return report


@bench_app.command("pool")
def pool_cmd(
    reports: Annotated[list[Path], typer.Argument(help="JSON files written by `flash bench run --json`")],
    loader: Annotated[str, typer.Option(help="the loader to compare with the raw read and the peers")] = (
        "flashtensors"
    ),
    markdown: Annotated[bool, typer.Option(help="print the table in Markdown (for BENCHMARKS.md)")] = False,
) -> None:
    """Pool the rounds of several runs, per shape, scenario and FLASH_* settings.

    Cold: the loader's GB/s over the raw disk read of the same round (median and quartiles).

    Every scenario: each peer's time over the loader's, round by round, and the rounds the loader won.

    The disk moves between rounds more than loaders differ, so ratios within rounds say more.
    """
    from flashtensors.bench.pool import format_pool, pool

    rows = pool([read_report(p) for p in reports], loader)
    if not rows:
        raise ConfigError(
            f"no timed run of {loader} in these reports",
            hint="check --loader against the loaders the runs timed (their tables list them)",
        )
    print(format_pool(rows, loader, markdown=markdown))


def register(app: typer.Typer) -> None:
    """Add the `bench` group to the `flash` app (once, however often `main` runs)."""
    if not any(group.typer_instance is bench_app for group in app.registered_groups):
        app.add_typer(bench_app, name="bench")
