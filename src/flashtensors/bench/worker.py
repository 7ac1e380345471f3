"""One timed measurement in a fresh process, and how the runner starts that process.

Standalone (for debugging): ``python -m flashtensors.bench.worker SPEC_JSON`` prints ``RESULT_PREFIX`` +
JSON on stdout. The runner uses a :class:`Launcher`: each run is a child of multiprocessing's fork server,
which imported torch, safetensors and flashtensors once and never initialized CUDA, so every run is a
brand-new process (own CUDA context; no allocator or pinned state from another run) that does not pay
~4 s of ``import torch``. Before the clock: the loader's imports, the CUDA context, the scenario's cache
state. The clock stops when every tensor is resident on the device and the device is synchronized.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import json
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from flashtensors.bench.cache import drop_cache, warm_cache
from flashtensors.bench.checksum import digests
from flashtensors.bench.limits import disk_read, machine_info, measure_limits
from flashtensors.bench.loaders import LOADERS, Target, import_loader, resident

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
    read = warm_cache(files)  # skipped, file by file, where the pages are resident already
    warmed = {"cache": "warm", "warm_read_bytes": read, "warm_read_seconds": time.perf_counter() - t0}
    if scenario != "hot":
        return warmed
    if loader == "flashtensors" and device.startswith("cuda"):
        import flashtensors as ft

        need = int(sum(os.path.getsize(f) for f in files) * 1.05)
        ft.configure(mem_pool_size=max(need, ft.get_settings().mem_pool_size))
        pinned: list[str | os.PathLike[str]] = list(files)
        ft.pin(pinned)
        return dict(warmed, hot="files pinned in the RAM tier (ft.pin) before the clock")
    state = LOADERS[loader].load(target, device)
    resident(state, device)
    del state
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()  # the timed load pays for its device memory, as in the other scenarios
    why = "pinning serves GPU loads only" if loader == "flashtensors" else "no RAM tier for this loader"
    return dict(warmed, hot=f"second load in the same process ({why})")


def _e2e(spec: dict[str, Any], target: Target) -> tuple[dict[str, Any], Any]:
    """Time load + first generated token; returns figures and a state dict to checksum (or None)."""
    import torch

    loader, device = spec["loader"], spec["device"]
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
    figures = {"seconds": t1 - t0, "load_seconds": t_load - t0, "first_token_seconds": t1 - t_load}
    return dict(figures, generated_tokens=tokens), state


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
    gc.collect()
    t3 = time.perf_counter()
    result["setup_seconds"] = {"device": t1 - t0, "imports": t2 - t1, "prepare": t3 - t2}
    result["rss_before_bytes"] = _rss()
    if spec["scenario"] == "e2e":
        figures, state = _e2e(spec, target)
        result.update(figures)
    else:
        t0 = time.perf_counter()
        state = LOADERS[spec["loader"]].load(target, device)
        result["bytes"] = resident(state, device)
        result["seconds"] = time.perf_counter() - t0
        result["tensors"] = len(state)
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
    return disk_read(spec["files"], int(spec["threads"]), spec.get("cache_drop", "auto"))


KINDS = {"load": run_load, "limits": run_limits, "disk": run_disk, "probe": lambda spec: {}}


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


# ---------------------------------------------------------------- starting workers

START_METHODS = ("forkserver", "exec")
# What the fork server imports once; each child inherits it. Peers are not listed: one of them could
# initialize CUDA at import, which would leave every child without a usable GPU.
PRELOAD = ("torch", "safetensors.torch", "flashtensors.engine.api", "flashtensors.bench.worker")

# Written in the parent just before each fork (see _note_parent); a forked child reads what its parent was.
_FORK_PARENT: dict[str, Any] | None = None


def _cuda_driver_loaded() -> bool:
    """Whether libcuda is mapped here (recorded for the report, not a reason to refuse: a CUDA build of
    torch maps it at import without initializing it; seen on the lent H100 image, torch 2.11 cu130)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return b"/libcuda.so" in f.read()
    except OSError:
        return False


def _note_parent() -> None:
    global _FORK_PARENT
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    _FORK_PARENT = {
        "pid": os.getpid(),
        "torch_imported": torch is not None,
        "cuda_initialized": bool(cuda is not None and cuda.is_initialized()),
        "cuda_driver_loaded": _cuda_driver_loaded(),
    }


os.register_at_fork(before=_note_parent)


def _parent_problem() -> str | None:
    """Why this forked child must not measure anything (None: its parent was CUDA-free)."""
    parent = _FORK_PARENT
    if parent is None or parent["pid"] != os.getppid():  # another fork server, started without us
        return "the fork server did not preload flashtensors.bench.worker: its CUDA state is unknown"
    if parent["cuda_initialized"]:
        return "the fork server had initialized CUDA: a child cannot use the GPU"
    return None


def _child(spec: dict[str, Any], env: dict[str, str], result_path: str, log_path: str) -> None:
    """The body of a fork-server child: isolate itself, check its parent, measure, write the result."""
    os.setpgid(0, 0)  # its own process group, so that a timeout also kills whatever it started
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)  # the runner's stdout carries the table, not worker chatter
    os.dup2(fd, 2)
    os.close(fd)
    faulthandler.enable()  # a segfault leaves its traceback in the log, which the runner quotes
    # The server's objects (torch's modules) are the child's too: freezing them, an O(1) splice, keeps
    # each gc.collect() from walking (and copying on write) all of them, 0.15 s per call otherwise.
    gc.freeze()
    os.environ.clear()  # the server's environment dates from its start; a run sees the runner's now
    os.environ.update(env)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from flashtensors.config import reset_settings

    reset_settings()
    problem = _parent_problem()
    result = {"error": problem} if problem else measure(spec)[0]
    result["worker"] = {"start": "forkserver", "pid": os.getpid(), "parent": _FORK_PARENT}
    tmp = f"{result_path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, result_path)  # the runner reads a whole result or none


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # not its own group leader yet: the process alone
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _no_result(code: int | None, log: Path) -> str:
    how = f"was killed by {signal.Signals(-code).name}" if code and code < 0 else f"exited with status {code}"
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:  # it died before _child ran, while multiprocessing prepared it (stderr has why)
        return f"worker {how} before it started: multiprocessing could not prepare it (see stderr)"
    # faulthandler prints the innermost frames first, right after its "Fatal Python error" line.
    fatal = next((i for i, line in enumerate(lines) if line.startswith("Fatal Python error")), None)
    return f"worker {how} and left no result: " + " | ".join(
        lines[fatal : fatal + 4] if fatal is not None else lines[-5:]
    )


class Launcher:
    """Starts every run of a bench in a fresh process and collects its result record.

    Args:
        start: ``forkserver`` (children of a pre-imported, CUDA-free server) or ``exec``
            (``python -m flashtensors.bench.worker``, the standalone entry).
        preload: modules the fork server imports once. There is one server per Python process, started
            by the first launcher: later launchers share it, whatever they ask to preload.

    Every record gets ``wall_seconds`` (process start to exit, seen by the runner) and ``worker`` (start
    method, pid, exit status, the fork server's state). A crash or a timeout (the worker's process group
    is killed) becomes the record's ``error``.
    """

    def __init__(self, start: str = "forkserver", preload: tuple[str, ...] = PRELOAD) -> None:
        if start not in START_METHODS:
            raise ValueError(f"start must be one of {', '.join(START_METHODS)}, not {start!r}")
        self.start = start
        self.preload = tuple(preload)
        self.workdir = Path(tempfile.mkdtemp(prefix="flash-bench-"))
        self.count = 0
        self._ctx = multiprocessing.get_context("forkserver") if start == "forkserver" else None
        if self._ctx is not None:
            # The server inherits this environment when it starts. With it, a preloaded library that
            # asks torch.cuda.is_available() gets an answer from NVML instead of initializing the
            # driver, which would leave every child without a usable GPU.
            os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
            self._ctx.set_forkserver_preload(list(self.preload))

    def warm_up(self) -> dict[str, Any]:
        """Start the fork server (its imports) with a child that measures nothing; describe the workers."""
        info: dict[str, Any] = {"start": self.start}
        if self._ctx is not None:
            probe = self.run({"kind": "probe"}, timeout=600.0)
            info.update(preload=list(self.preload), startup_seconds=probe["wall_seconds"])
            info["server_pid"] = (probe["worker"].get("parent") or {}).get("pid")
            if probe.get("error"):
                info["error"] = probe["error"]
        return info

    def run(self, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Run one measurement in a fresh process and return its record (see the class docstring)."""
        self.count += 1
        base = self.workdir / f"run-{self.count:04d}"
        t0 = time.perf_counter()
        record, worker = (self._fork if self._ctx is not None else self._exec)(spec, timeout, base)
        if worker["exit"] is None:
            record = {"error": f"timed out after {timeout:g} s (killed)"}
        elif record is None:
            record = {"error": _no_result(worker["exit"], base.with_suffix(".log"))}
        record["worker"] = dict(record.get("worker") or {}, **worker)
        record["wall_seconds"] = time.perf_counter() - t0
        return record

    def _fork(self, spec: dict[str, Any], timeout: float, base: Path) -> tuple[dict | None, dict]:
        assert self._ctx is not None
        result = base.with_suffix(".json")
        args = (spec, dict(os.environ), str(result), str(base.with_suffix(".log")))
        proc = self._ctx.Process(target=_child, args=args, name=f"flash-bench-{self.count}")
        proc.start()
        pid, code = proc.pid, None
        try:
            proc.join(timeout)
            code = proc.exitcode
        finally:  # a timeout, or Ctrl-C (the child has its own process group: the terminal's misses it)
            if code is None:
                _kill_group(pid)
                proc.join()
            proc.close()
        try:
            record = json.loads(result.read_text()) if code is not None else None
        except (OSError, ValueError):
            record = None
        return record, {"start": "forkserver", "pid": pid, "exit": code}

    def _exec(self, spec: dict[str, Any], timeout: float, base: Path) -> tuple[dict | None, dict]:
        cmd = [sys.executable, "-m", "flashtensors.bench.worker", json.dumps(spec)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        with open(base.with_suffix(".log"), "w") as err:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, start_new_session=True
            )
            try:
                out, _ = proc.communicate(timeout=timeout)
                code = proc.returncode
            except BaseException as exc:  # a timeout, or Ctrl-C: kill the worker and what it started
                _kill_group(proc.pid)
                proc.communicate()
                if not isinstance(exc, subprocess.TimeoutExpired):
                    raise
                out, code = "", None
        lines = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
        record = json.loads(lines[-1][len(RESULT_PREFIX) :]) if lines else None
        return record, {"start": "exec", "pid": proc.pid, "exit": code}

    def close(self) -> None:
        """Remove the logs and result files of the runs."""
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main())
