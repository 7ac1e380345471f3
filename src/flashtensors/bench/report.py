"""Turn a raw bench report into medians, ratios to the limits, and a table."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

from flashtensors.bench.limits import limit_for, shape_name

BASELINE = {"cold": "safetensors", "warm": "safetensors", "hot": "safetensors", "e2e": "transformers"}


def summarize(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (scenario, loader): median seconds, GB/s, ratio to the limit, speed-up, status.

    GB/s is the checkpoint's tensor bytes over the median time. The limit is the scenario's ceiling
    (see :func:`flashtensors.bench.limits.limit_for`); for cold that is the median of the disk reads
    interleaved with the cold runs, and the row also carries ``start_limit_gbps`` / ``start_ratio``
    against the disk figure of the limits step. The speed-up is the baseline's median over this one
    (baseline: safetensors, or transformers for e2e).

    Returns:
        Rows in run order, skipped pairs included with status ``skipped``.
    """
    nbytes = report["checkpoint"]["bytes"]
    device = report["options"]["device"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in report["runs"]:
        groups.setdefault((run["scenario"], run["loader"]), []).append(run)
    medians: dict[tuple[str, str], float] = {}
    rows: list[dict[str, Any]] = []
    for (scenario, loader), runs in groups.items():
        timed = [r["seconds"] for r in runs if r.get("status") in ("ok", "FAIL")]
        statuses = {r["status"] for r in runs}
        status = "FAIL" if "FAIL" in statuses else "error" if not timed else "ok"
        row: dict[str, Any] = {"scenario": scenario, "loader": loader, "runs": len(timed), "status": status}
        notes = {r.get("hot") or "" for r in runs} - {""}
        if timed and "error" in statuses:
            notes.add(f"{len(runs) - len(timed)} of {len(runs)} runs failed: " + _first_error(runs))
        if not timed:
            row["note"] = _first_error(runs)
        else:
            median = statistics.median(timed)
            medians[(scenario, loader)] = median
            row.update(seconds=median, gbps=nbytes / median / 1e9, all_seconds=timed)
            limits = report.get("limits") or {}
            limit, limit_name = limit_for(scenario, limits, device)
            if limit:
                row.update(limit=limit_name, limit_gbps=limit, ratio=row["gbps"] / limit)
            start = limits.get("disk", {}).get("gbps") if limit_name == "disk_interleaved" else None
            if start:  # the start-of-run figure too, so both ratios are in the JSON
                row.update(start_limit_gbps=start, start_ratio=row["gbps"] / start)
            read = [r for r in runs if r.get("status") in ("ok", "FAIL") and r.get("reads")]
            if read and len(read) == len(timed):  # flashtensors: its reads apart from what surrounds them
                notes.add(_reads_note(row, read, nbytes))
            if scenario == "e2e":
                ok = [r for r in runs if "first_token_seconds" in r]
                row["load_seconds"] = statistics.median(r["load_seconds"] for r in ok)
                row["first_token_seconds"] = statistics.median(r["first_token_seconds"] for r in ok)
                notes.add(
                    f"load {row['load_seconds']:.3f} s + first token {row['first_token_seconds']:.3f} s"
                )
            if notes:
                row["note"] = "; ".join(sorted(notes))
        rows.append(row)
    for row in rows:
        base = medians.get((row["scenario"], BASELINE[row["scenario"]]))
        if base and "seconds" in row:
            row["speedup"] = base / row["seconds"]
        if row["loader"] == "flashtensors" and "seconds" in row:
            _paired(row, groups)
    rows += [
        {"scenario": s["scenario"], "loader": s["loader"], "status": "skipped", "note": s["note"]}
        for s in report.get("skipped", [])
    ]
    return rows


def _reads_note(row: dict[str, Any], runs: list[dict[str, Any]], nbytes: int) -> str:
    """Median read rate between a run's first and last file read, and the time outside them; into ``row``
    too. (The checkpoint's bytes over the window: the reads also take the headers and alignment.)"""
    spans = [max(r["reads"][1] - r["reads"][0], 1e-9) for r in runs]
    row["reads_gbps"] = statistics.median(nbytes / span / 1e9 for span in spans)
    row["before_reads_seconds"] = statistics.median(r["reads"][0] for r in runs)
    row["after_reads_seconds"] = statistics.median(r["seconds"] - r["reads"][1] for r in runs)
    of = f" ({100 * row['reads_gbps'] / row['limit_gbps']:.0f}% of limit)" if row.get("limit_gbps") else ""
    return (
        f"reads alone {row['reads_gbps']:.2f} GB/s{of}, {1e3 * row['before_reads_seconds']:.0f} ms before "
        f"the first, {1e3 * row['after_reads_seconds']:.0f} ms after the last (medians)"
    )


def _paired(row: dict[str, Any], groups: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
    """Ours against each peer round by round: each repeat runs every loader once, in a shuffled order,
    so a round's runs meet much the same disk. On the H100 machine the disk read between the cold
    rounds of one run moved by 28% (1.74-2.23 GB/s, 2026-11-28), more than the loaders differ. Into
    ``row["paired"]`` (peer -> median of the peer's seconds over ours, rounds ours was faster, rounds)
    and a note."""
    ours = {r["repeat"]: r["seconds"] for r in groups[(row["scenario"], row["loader"])] if _timed(r)}
    paired: dict[str, dict[str, Any]] = {}
    for (scenario, loader), runs in groups.items():
        if scenario != row["scenario"] or loader == row["loader"]:
            continue
        ratios = [r["seconds"] / ours[r["repeat"]] for r in runs if _timed(r) and r["repeat"] in ours]
        if len(ratios) >= 3:
            paired[loader] = {
                "median": statistics.median(ratios),
                "faster": sum(x > 1 for x in ratios),
                "rounds": len(ratios),
            }
    if paired:
        row["paired"] = paired
        said = [
            f"{p} {v['median']:.2f}x (ours faster in {v['faster']} of {v['rounds']})"
            for p, v in paired.items()
        ]
        note = "round by round, the peer's time over ours (median): " + ", ".join(said)
        row["note"] = "; ".join(filter(None, [row.get("note"), note]))


def _timed(run: dict[str, Any]) -> bool:
    return run.get("status") in ("ok", "FAIL") and "repeat" in run and "seconds" in run


def _first_error(runs: list[dict[str, Any]]) -> str:
    return next((r["error"] for r in runs if r.get("error")), "")


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def render_table(head: list[str], lines: list[list[str]], markdown: bool = False) -> list[str]:
    """Rows of cells under a header, as aligned text or as a Markdown table; one string per line."""
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return out + ["| " + " | ".join(cells) + " |" for cells in lines]
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    return out + [
        "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip() for cells in lines
    ]


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The summary as an aligned text table (or a Markdown table)."""
    head = ["scenario", "loader", "median s", "GB/s", "limit", "of limit", "speed-up", "check", "runs"]
    lines = []
    for r in rows:
        limit = f"{r['limit']} {r['limit_gbps']:.2f}" if r.get("limit") else "—"
        lines.append(
            [
                r["scenario"],
                r["loader"],
                _fmt(r.get("seconds"), ".3f"),
                _fmt(r.get("gbps"), ".2f"),
                limit,
                _fmt(r.get("ratio") and 100 * r["ratio"], ".0f", "%"),
                _fmt(r.get("speedup"), ".2f", "x"),
                r["status"],
                str(r.get("runs", "")),
            ]
        )
    out = render_table(head, lines, markdown)
    notes = [f"  {r['scenario']} {r['loader']}: {r['note']}" for r in rows if r.get("note")]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)


def format_header(report: dict[str, Any]) -> str:
    """Checkpoint, machine and limits, a few lines above the table."""
    ck, m, lim = report["checkpoint"], report.get("machine") or {}, report.get("limits") or {}
    shape = ck.get("shape", {}).get("name", "")
    lines = [
        f"checkpoint: {ck['directory']} {shape} ({ck['bytes'] / 1e9:.2f} GB, {ck['tensors']} tensors, "
        f"{len(ck['files'])} files)",
    ]
    if m:
        where = m.get("gpu") or m.get("cpu", "")
        lines.append(
            f"machine: {where}, torch {m.get('torch')}, {m.get('cpu_count')} CPUs, "
            f"{m.get('filesystem', '')}, {m.get('date')}"
        )
    parts = []
    for key, label in (
        ("disk", "disk"),
        ("page_cache", "page cache"),
        ("memcpy", "memcpy"),
        ("h2d_pinned", "pinned H2D"),
        ("page_cache_pin", "pinning the page cache"),
    ):
        entry = lim.get(key)
        if entry is None:
            continue
        if entry.get("gbps") is None:
            parts.append(f"{label} n/a ({entry.get('error', '')})")
            continue
        extra = f" {entry['method']}" if key == "disk" and entry.get("method") != "O_DIRECT" else ""
        if "best_request" in entry:
            extra += f" ({shape_name(entry['best_threads'], entry['best_request'])})"
        elif "threads" in entry:  # runs from before request sizes were tried: 16 MiB requests
            best = max(entry["threads"], key=lambda k: entry["threads"][k])
            extra += f" ({best} threads)"
        parts.append(f"{label} {entry['gbps']:.2f} GB/s{extra}")
    if lim.get("error"):
        parts.append(f"limits failed: {lim['error']}")
    if parts:
        lines.append("limits (measured first): " + ", ".join(parts))
    inter = lim.get("disk_interleaved")
    if inter:
        runs = " ".join(f"{g:.2f}" for g in inter["runs"])
        threads = inter["threads"]
        how = shape_name(threads, inter["request"]) if "request" in inter else f"{threads} threads"
        how += f", {inter['method']}"
        lines.append(
            f"disk between the cold runs: median {inter['gbps']:.2f} GB/s ({runs}; {how}); "
            "cold 'of limit' uses this median"
        )
    workers = report.get("workers") or {}
    overhead = [
        r["wall_seconds"] - r["seconds"] for r in report["runs"] if "wall_seconds" in r and "seconds" in r
    ]
    if workers.get("start"):
        line = f"workers: {workers['start']}"
        if workers.get("startup_seconds") is not None:
            line += f" (server start {workers['startup_seconds']:.1f} s)"
        if overhead:
            line += f", median {statistics.median(overhead):.2f} s per run outside the clock"
        lines.append(line)
    caches = sorted({r["cache"] for r in report["runs"] if r.get("scenario") == "cold" and r.get("cache")})
    if caches:
        lines.append(
            "cold cache: "
            + ", ".join(caches)
            + (" (per-file posix_fadvise DONTNEED: drop_caches refused)" if caches == ["fadvise"] else "")
        )
    fill = report.get("options", {}).get("warm_fill")
    if fill and any(r.get("scenario") in ("warm", "hot") for r in report["runs"]):
        lines.append(
            "warm cache: "
            + (
                "each run evicts the files and reads them once, sequentially (--warm-fill fresh)"
                if fill == "fresh"
                else "pages already resident are kept as the previous run left them (--warm-fill keep)"
            )
        )
    memory = report.get("options", {}).get("hot_memory")
    if memory and any(r.get("scenario") == "hot" and r.get("hot_memory") for r in report["runs"]):
        lines.append(
            "hot device memory: "
            + (
                "fresh from the driver, torch's cache emptied before each timed load (--hot-memory fresh)"
                if memory == "fresh"
                else "reused from torch's cache, where the untimed load freed it (--hot-memory reused)"
            )
        )
    prime = workers.get("e2e_prime")
    if prime:
        lines.append(
            "e2e: primed by one untimed run of a one-layer copy of the model before the first loader"
            + (f" ({prime['seconds']:.2f} s)" if "seconds" in prime else f": FAILED, {prime.get('error')}")
        )
    repeats = report["options"]["repeat"]
    if repeats < 3:
        lines.append(f"note: median of {repeats} run(s); BENCH.md asks for at least 3")
    return "\n".join(lines)


def write_json(path: str | Path, report: dict[str, Any]) -> None:
    """Write the report atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def failures(report: dict[str, Any]) -> list[str]:
    """One line per run whose bytes differ from the checkpoint's (empty: every check passed)."""
    return [
        f"{r['loader']} {r['scenario']} #{r['repeat'] + 1}: " + "; ".join(r["mismatches"])
        for r in report["runs"]
        if r.get("status") == "FAIL"
    ]
