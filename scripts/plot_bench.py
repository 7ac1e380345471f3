"""Draw GB/s per loader per scenario from `flash bench run --json` files (one per checkpoint shape).

    python scripts/plot_bench.py OUT.png benches/results/*.json

Needs matplotlib (`pip install matplotlib`); the bench itself does not.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

SCENARIOS = ("cold", "warm", "hot", "e2e")


def medians(report: dict) -> dict[tuple[str, str], float]:
    """(scenario, loader) -> median GB/s over the run's successful repeats."""
    nbytes = report["checkpoint"]["bytes"]
    figures: dict[tuple[str, str], list[float]] = defaultdict(list)
    for run in report["runs"]:
        if run.get("status") == "ok" and run.get("seconds"):
            figures[(run["scenario"], run["loader"])].append(nbytes / run["seconds"] / 1e9)
    return {key: statistics.median(values) for key, values in figures.items()}


def _shape_name(report: dict) -> str:
    shape = report["checkpoint"].get("shape")
    if isinstance(shape, dict) and shape.get("name"):
        return str(shape["name"])
    return Path(report["checkpoint"]["directory"]).name


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, paths = Path(argv[0]), [Path(p) for p in argv[1:]]
    reports = sorted((json.loads(p.read_text()) for p in paths), key=lambda r: r["checkpoint"]["bytes"])
    # Runs of one shape split over several commands (scenario subsets) share a column.
    shapes: list[str] = []
    table: list[dict[tuple[str, str], float]] = []
    for report in reports:
        name = _shape_name(report)
        if name not in shapes:
            shapes.append(name)
            table.append({})
        table[shapes.index(name)].update(medians(report))
    scenarios = [s for s in SCENARIOS if any(k[0] == s for m in table for k in m)]
    loaders = sorted({k[1] for m in table for k in m}, key=lambda name: (name != "flashtensors", name))
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5 * len(scenarios), 4.5), squeeze=False)
    width = 0.8 / max(1, len(loaders))
    colors = {name: f"C{i}" for i, name in enumerate(loaders)}  # one colour per loader in every panel
    for ax, scenario in zip(axes[0], scenarios, strict=True):
        for i, loader in enumerate(loaders):
            values = [m.get((scenario, loader), 0.0) for m in table]
            if not any(values):
                continue
            xs = [x + (i - len(loaders) / 2 + 0.5) * width for x in range(len(shapes))]
            ax.bar(
                xs,
                values,
                width,
                label=loader if ax is axes[0][0] or scenario == "e2e" else None,
                color=colors[loader],
            )
        ax.set_title(scenario)
        ax.set_xticks(range(len(shapes)), shapes, rotation=20)
        ax.set_ylabel("GB/s (median)")
        ax.grid(axis="y", alpha=0.3)
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=9)
    card = reports[0].get("machine", {}).get("gpu") or reports[0].get("machine", {}).get("device", "")
    fig.suptitle(f"flash bench run — {card}".strip(" —"))
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
