"""One timed measurement in a fresh process.

Standalone (for debugging): ``python -m flashtensors.bench.worker SPEC_JSON`` prints ``RESULT_PREFIX`` +
JSON on stdout. The runner starts these processes with :class:`flashtensors.bench.launcher.Launcher`.
Before the clock: the loader's imports, the CUDA context, the scenario's cache state. The clock stops when
every tensor is resident on the device and the device is synchronized.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from flashtensors.bench.cache import drop_cache, warm_cache
from flashtensors.bench.checksum import digests
from flashtensors.bench.limits import disk_read, machine_info, measure_limits
from flashtensors.bench.loaders import (
    LOADERS,
    Target,
    import_loader,
    read_paths,
    resident,
    take_details,
    warm_resident,
)

RESULT_PREFIX = "FLASHBENCH-RESULT "
PROMPT = "The quick brown fox"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory(device: str) -> dict[str, Any]:
    out: dict[str, Any] = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info()
        out["gpu_used_bytes"] = total - free  # the whole device, the CUDA context included
        out["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _init_device(device: str) -> None:
    """Create the CUDA context now, so that no timed call pays for it."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.init()
        torch.empty(1, device=device)
        torch.cuda.synchronize()


def _prepare(spec: dict[str, Any], target: Target) -> dict[str, Any]:
    """Bring the page cache (and the RAM tier, for hot) into the scenario's state; say how."""
    scenario, loader, device = spec["scenario"], spec["loader"], spec["device"]
    files = list(target.files)
    if scenario == "cold":
        return {"cache": drop_cache(files, spec.get("cache_drop", "auto"))}
    t0 = time.perf_counter()
    fresh = spec.get("warm_fill") == "fresh"
    if fresh:  # the state a download or `cat` leaves, whoever read the files before
        drop_cache(files, "fadvise")
    read = warm_cache(files)  # skipped, file by file, where the pages are resident already
    warmed = {
        "cache": "warm, re-read sequentially" if fresh else "warm",
        "warm_read_bytes": read,
        "warm_read_seconds": time.perf_counter() - t0,
    }
    if scenario != "hot":
        return warmed
    if loader == "flashtensors" and device.startswith("cuda"):
        import flashtensors as ft

        need = int(sum(os.path.getsize(f) for f in files) * 1.05)
        ft.configure(mem_pool_size=max(need, ft.get_settings().mem_pool_size))
        pinned: list[str | os.PathLike[str]] = list(files)
        ft.pin(pinned)
        how = "files pinned in the RAM tier (ft.pin) and loaded once before the clock"
    else:
        why = "pinning serves GPU loads only" if loader == "flashtensors" else "no RAM tier for this loader"
        how = f"second load in the same process ({why})"
    # Every loader's timed hot load is its second in the process, as in a server that holds the model.
    state = LOADERS[loader].load(target, device)
    resident(state, device)
    del state
    gc.collect()
    memory = None
    if device.startswith("cuda"):
        import torch

        if spec.get("hot_memory", "fresh") == "fresh":
            torch.cuda.empty_cache()  # the timed load gets its device memory from the driver
            memory = "fresh from the driver (torch's cache emptied before the clock)"
        else:
            memory = "reused from torch's cache (the untimed load's, freed before the clock)"
    return dict(warmed, hot=how, **({"hot_memory": memory} if memory else {}))


def _e2e(spec: dict[str, Any], target: Target) -> tuple[dict[str, Any], Any]:
    """Time load + first generated token; returns figures and a state dict to checksum (or None)."""
    import torch

    loader, device = spec["loader"], spec["device"]
    details: dict[str, Any] = {}
    t0 = time.perf_counter()
    if loader == "transformers":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(target.directory), device_map=device, dtype="auto")
        _sync(device)
        t_load = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(str(target.directory))
        ids = tok(PROMPT, return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=1, do_sample=False)
        _sync(device)
        t1 = time.perf_counter()
        tokens = int(out.shape[-1] - ids["input_ids"].shape[-1])
        state = model.state_dict()
    else:
        from flashtensors.models import load_model  # what ft.load_model resolves to

        llm = load_model(model_id=str(target.directory), backend="transformers", dtype="auto", device=device)
        _sync(device)
        t_load = time.perf_counter()
        outputs = llm.generate([PROMPT], max_tokens=1, temperature=0.0)
        _sync(device)
        t1 = time.perf_counter()
        tokens = len(outputs[0].outputs[0].token_ids)
        state = llm.model.state_dict()
        details["read_paths"] = read_paths(llm.load_stats.paths)  # as in flashtensors' other runs
    figures = {"seconds": t1 - t0, "load_seconds": t_load - t0, "first_token_seconds": t1 - t_load}
    return dict(figures, generated_tokens=tokens, **details), state


def run_load(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one (loader, scenario) load as ``spec`` describes; returns the result record.

    ``setup_seconds`` says what the run spent before the clock: the CUDA context, the loader's imports
    (little in a fork-server child, which inherits torch) and the cache state.
    """
    device = spec["device"]
    t0 = time.perf_counter()
    _init_device(device)
    t1 = time.perf_counter()
    target = Target(Path(spec["directory"]), tuple(Path(f) for f in spec["files"]))
    import_loader(spec["loader"], target, spec["scenario"])
    t2 = time.perf_counter()
    result: dict[str, Any] = {"loader": spec["loader"], "scenario": spec["scenario"], "device": device}
    result.update(_prepare(spec, target))
    if spec["scenario"] != "e2e":
        warm_resident(device)  # the clock's own page touch, its code paged in (not a loader's cost)
    gc.collect()
    t3 = time.perf_counter()
    result["setup_seconds"] = {"device": t1 - t0, "imports": t2 - t1, "prepare": t3 - t2}
    result["rss_before_bytes"] = _rss()
    if spec["scenario"] == "e2e":
        figures, state = _e2e(spec, target)
        result.update(figures)
    else:
        take_details()  # a load made while preparing (hot) is not the timed one
        before = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        state = LOADERS[spec["loader"]].load(target, device)
        result["bytes"] = resident(state, device)
        result["seconds"] = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF)
        # Page faults on the clock: major ones read code or data back from the disk the load is using.
        result["faults"] = {
            "major": after.ru_majflt - before.ru_majflt,
            "minor": after.ru_minflt - before.ru_minflt,
        }
        result["tensors"] = len(state)
        result.update(take_details())
    result.update(_memory(device))
    result["checksums"] = digests(state, spec["names"]) if state is not None else None
    return result


def run_limits(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure the physical limits and describe the machine."""
    device = spec["device"]
    _init_device(device)
    sizes = {key: spec[key] for key in ("limit_bytes", "h2d_bytes", "memcpy_bytes")}
    limits = measure_limits(spec["files"], device=device, cache_drop=spec.get("cache_drop", "auto"), **sizes)
    return {"limits": limits, "machine": machine_info(device, Path(spec["directory"]))}


def run_disk(spec: dict[str, Any]) -> dict[str, Any]:
    """One raw read of every byte of the files, cache dropped first (cold's interleaved disk run)."""
    request = int(spec["request"])
    return disk_read(spec["files"], int(spec["threads"]), spec.get("cache_drop", "auto"), request=request)


def run_prime(spec: dict[str, Any]) -> dict[str, Any]:
    """Run a one-layer, small-vocabulary copy of the model's ``generate`` on the device, untimed.

    The first process on a machine to run a model's kernels pays what later processes find ready: the
    GPU libraries read from disk into the page cache, kernel caches. In the bench that was the first e2e
    run, whichever loader it was: 1.2 s more than later runs, all in its first token (H100 machine). This
    step pays it once before any e2e run, for every loader alike.
    """
    import torch
    import transformers

    from flashtensors.backends.placement import read_layout
    from flashtensors.backends.transformers_backend import _resolve_dtype, auto_class_for
    from flashtensors.backends.warmup import warm_up

    device = spec["device"]
    _init_device(device)
    config = transformers.AutoConfig.from_pretrained(spec["directory"], local_files_only=True)
    # The dtype both loaders run in (dtype="auto" in _e2e), by load_model's own rule.
    dtype = _resolve_dtype(None, config, read_layout(Path(spec["directory"])))
    seconds = warm_up(auto_class_for(config), config, dtype, torch.device(device))
    if seconds is None:
        raise RuntimeError("the model's small copy could not run (see the worker's log)")
    return {"seconds": seconds}


def run_machine(spec: dict[str, Any]) -> dict[str, Any]:
    """Describe the machine only (``--no-limits`` runs)."""
    _init_device(spec["device"])
    return {"machine": machine_info(spec["device"], Path(spec["directory"]))}


KINDS = {
    "load": run_load,
    "limits": run_limits,
    "machine": run_machine,
    "disk": run_disk,
    "prime": run_prime,
    "probe": lambda spec: {},
}


def measure(spec: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Run the measurement ``spec["kind"]`` names (default ``load``); an exception becomes ``error``.

    Returns:
        The result record and an exit status (0, or 1 when the record carries an error).
    """
    try:
        kind = spec.get("kind", "load")
        if kind not in KINDS:
            raise ValueError(f"unknown worker kind {kind!r}; known: {', '.join(KINDS)}")
        return KINDS[kind](spec), 0
    except Exception as exc:  # reported to the runner as this run's error, not as a crash
        traceback.print_exc(file=sys.stderr)
        return {"error": f"{type(exc).__name__}: {exc}".strip()[:2000]}, 1


def main(argv: list[str] | None = None) -> int:
    """Run the measurement described by the JSON in ``argv[0]``; print the result line."""
    args = sys.argv[1:] if argv is None else argv
    result, code = measure(json.loads(args[0]))
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
