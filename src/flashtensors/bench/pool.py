"""Rounds of several bench runs pooled: one loader against the raw disk read and against each peer.

One run's medians move with the disk: on the H100 machine the raw read between the cold rounds of one
run spread by ±20%. Each round (one repeat) runs every loader once and, in cold, one raw O_DIRECT read,
so a round's figures met much the same disk. Pooled over the rounds of several runs, the ratios within
each round say more than the medians of any one run.

``flash bench pool RUN.json ...`` prints what this module computes.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any

from flashtensors.bench.report import render_table


def _label(settings: dict[str, str] | None) -> str:
    if settings is None:
        return "not recorded"
    return " ".join(f"{k}={v}" for k, v in sorted(settings.items())) or "defaults"


def _shape(report: dict[str, Any]) -> str:
    ckpt = report["checkpoint"]
    return (ckpt.get("shape") or {}).get("name") or str(ckpt["directory"]).rstrip("/").rsplit("/", 1)[-1]


def _spread(values: list[float]) -> dict[str, float]:
    """Median and quartiles (the median itself for one value)."""
    if len(values) < 2:
        return {"median": values[0], "q1": values[0], "q3": values[0]}
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3}


def _timed(run: dict[str, Any]) -> bool:
    return run.get("status") == "ok" and "seconds" in run and "repeat" in run


def rounds(report: dict[str, Any], loader: str) -> dict[str, list[dict[str, Any]]]:
    """Per scenario, one entry per repeat in which ``loader`` ran: its seconds and GB/s, the raw read's
    GB/s of the same repeat (cold only, else None) and each peer's seconds and GB/s in that repeat."""
    nbytes = report["checkpoint"]["bytes"]
    raw = {
        r["repeat"]: r["gbps"] for r in report.get("disk_runs", []) if r.get("status") == "ok" and "gbps" in r
    }
    out: dict[str, list[dict[str, Any]]] = {}
    for run in report["runs"]:
        if run["loader"] != loader or not _timed(run):
            continue
        scenario, rep = run["scenario"], run["repeat"]
        peers = {
            p["loader"]: p["seconds"]
            for p in report["runs"]
            if p["scenario"] == scenario and p["repeat"] == rep and p["loader"] != loader and _timed(p)
        }
        out.setdefault(scenario, []).append(
            {
                "seconds": run["seconds"],
                "gbps": nbytes / run["seconds"] / 1e9,
                "raw_gbps": raw.get(rep) if scenario == "cold" else None,
                "peers": {name: {"seconds": sec, "gbps": nbytes / sec / 1e9} for name, sec in peers.items()},
            }
        )
    return out


def pool(reports: Iterable[dict[str, Any]], loader: str = "flashtensors") -> list[dict[str, Any]]:
    """One row per (shape, scenario, FLASH_* settings) over every report given.

    Each row: ``shape``, ``scenario``, ``settings`` (the variables the runs set, ``defaults``, or ``not
    recorded`` for reports older than that record), ``runs``, ``rounds``; ``of_raw`` (the loader's GB/s
    over the same round's raw read: median and quartiles; cold only); and per peer ``rounds``, ``faster``
    (rounds the loader was faster), ``ratio`` (the peer's seconds over the loader's: median) and
    ``of_raw`` (the peer's, median).
    """
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for report in reports:
        label = _label(report.get("settings"))
        for scenario, entries in rounds(report, loader).items():
            key = (_shape(report), scenario, label)
            group = groups.setdefault(key, {"runs": 0, "entries": []})
            group["runs"] += 1
            group["entries"] += entries
    rows = []
    for (shape, scenario, label), group in groups.items():
        entries = group["entries"]
        row: dict[str, Any] = {
            "shape": shape,
            "scenario": scenario,
            "settings": label,
            "runs": group["runs"],
            "rounds": len(entries),
        }
        of_raw = [e["gbps"] / e["raw_gbps"] for e in entries if e["raw_gbps"]]
        if of_raw:
            row["of_raw"] = _spread(of_raw)
        peers: dict[str, Any] = {}
        for name in sorted({p for e in entries for p in e["peers"]}):
            met = [e for e in entries if name in e["peers"]]
            ratios = [e["peers"][name]["seconds"] / e["seconds"] for e in met]
            peer = {
                "rounds": len(met),
                "faster": sum(r > 1 for r in ratios),
                "ratio": statistics.median(ratios),
            }
            theirs = [e["peers"][name]["gbps"] / e["raw_gbps"] for e in met if e["raw_gbps"]]
            if theirs:
                peer["of_raw"] = statistics.median(theirs)
            peers[name] = peer
        row["peers"] = peers
        rows.append(row)
    return rows


def format_pool(rows: list[dict[str, Any]], loader: str = "flashtensors", markdown: bool = False) -> str:
    """The pooled rows as a table: one line per group and peer (one line with dashes where no peer ran)."""
    head = ["shape", "scenario", "settings", "runs", "rounds", f"{loader} of raw read"]
    head += ["peer", "peer of raw read", "ours faster", "peer's time / ours"]
    lines = []
    for r in rows:
        raw = r.get("of_raw")
        ours = f"{100 * raw['median']:.0f}% ({100 * raw['q1']:.0f}-{100 * raw['q3']:.0f}%)" if raw else "—"
        base = [r["shape"], r["scenario"], r["settings"], str(r["runs"]), str(r["rounds"]), ours]
        if not r["peers"]:
            lines.append([*base, "—", "—", "—", "—"])
        for name, p in r["peers"].items():
            theirs = f"{100 * p['of_raw']:.0f}%" if "of_raw" in p else "—"
            lines.append([*base, name, theirs, f"{p['faster']} of {p['rounds']}", f"{p['ratio']:.2f}x"])
    return "\n".join(render_table(head, lines, markdown))
