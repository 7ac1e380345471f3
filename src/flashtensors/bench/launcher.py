"""How the runner starts each measurement in a fresh process.

Each run is a child of multiprocessing's fork server, which imported torch, safetensors and flashtensors
once and never initialized CUDA, so every run is a brand-new process (own CUDA context; no allocator or
pinned state from another run) that does not pay ~4 s of ``import torch``. Where the fork server is
unusable, ``python -m flashtensors.bench.worker`` is started instead. The measurement itself is
:mod:`flashtensors.bench.worker`.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flashtensors.bench.worker import RESULT_PREFIX, measure

START_METHODS = ("forkserver", "exec")
# What the fork server imports once; each child inherits it. Peers are not listed: one of them could
# initialize CUDA at import, which would leave every child without a usable GPU.
PRELOAD = ("torch", "safetensors.torch", "flashtensors.engine.api", "flashtensors.bench.launcher")

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
        return "the fork server did not preload flashtensors.bench.launcher: its CUDA state is unknown"
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
    result: dict[str, Any] = {"error": problem} if problem else measure(spec)[0]
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
        pid = proc.pid
        assert pid is not None  # start() returned, so the child exists
        code = None
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
