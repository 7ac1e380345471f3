"""Raw O_DIRECT reads of a checkpoint's shards three ways, each in a fresh process after a cache drop,
in rotation (seventeenth session: is the cold gap our readers' Python work per request?).

python aioread.py DIR ROUNDS "thr 16 512K 0,thr 16 512K 30,aio 16 512K,aio 32 512K"

- ``thr N R W``: N threads take the next R-byte request from one queue (as the bench's raw limit does)
  and spend W microseconds of pure-Python work after each read, holding the GIL as our readers'
  bookkeeping does; ``thr N R W P``: each thread cycles through P places of R bytes (16 x P in all);
- ``own N R``: as ``thr N R 0``, but each thread copies its bytes to the GPU itself after each read
  and waits for that copy before its next read (16 landing places, no hand-off to a loading thread);
- ``ft``: our load with the defaults, onto the GPU (``ft FLASH_RING_SIZE=12M ...``: with those settings;
  ``ft PROBE_SRC=.probe/TREE/src``: another tree's code; ``PROBE_SWITCH=S``: any kind with the
  interpreter's switch interval set to S seconds);
- ``aio Q R``: one thread keeps Q requests of R bytes in flight through Linux native AIO
  (io_submit / io_getevents by syscall, no threads, the GIL released while it waits).

Every kind reads into huge pages: each thread's own R bytes, or Q places of R bytes. Prints one line per
run and ``AIO {kind: [median GB/s, [runs]]}`` last.

With ``PROBE_TRACE=1`` (nineteenth session), ``thr`` and ``ft`` runs also time every read request, and
``ft`` every wait of a reader for a free slot of the ring; each run's line then adds the reads' mean
latency, the mean number in flight over the reads' window, and the slot waits in all (s, summed over
readers). A load's rate is (reads in flight x request bytes / latency): the trace says which of the
two falls short of raw's. ``ft`` runs also give, per slot, mean/p90 ms (count) of its way back to a
reader: ``to_owner`` (read done to the owner taking it), ``in_owner`` (taken to freed: its copy queued
and seen done) and ``to_reader`` (freed to a waiting reader having it). With the native AIO feeder (branch
``next-lease/aio-feeder``), each refill of its reads while chunks are left is counted: how many left fewer
than ``depth`` in flight (``short``, for want of an idle slot), by how many on average, and the copies not
yet freed (v2 refills twice per reap: before queueing the reaped slots' copies, when only spare slots are
idle, so a burst of completions leaves that one short; then after); and the reaps: how many, reads per
reap, and the share of the reads' window the loading thread spent outside them (``busy``: its own work).
"""

import ctypes
import functools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.environ.get("PROBE_SRC", "src"))
from flashtensors.bench.cache import drop_cache  # noqa: E402
from flashtensors.engine.sysio import Mapping, buffer_at  # noqa: E402

TRACE = os.environ.get("PROBE_TRACE") == "1"
SPANS: list[tuple[float, float]] = []  # (start, end) of every read request, with TRACE
WAITS: list[float] = []  # seconds each wait for a free ring slot took, with TRACE
# With TRACE, per slot hand-over (ft): reader done -> owner takes it, owner takes it -> slot freed (its
# copy queued and seen done), slot freed -> a reader that waited for it has it.
STAGES: dict[str, list[float]] = {"to_owner": [], "in_owner": [], "to_reader": []}
# With TRACE, the AIO feeder's refills while chunks are left: (reads short of depth, copies not yet freed)
REFILLS: list[tuple[int, int]] = []
# With TRACE, each reap of native AIO reads: (seconds in it, reads reaped)
REAPS: list[tuple[float, int]] = []


def traced(read: Callable[..., int]) -> Callable[..., int]:
    """``read`` that notes its (start, end) in SPANS; list.append is atomic under the GIL."""

    def timed(*a: object) -> int:
        began = time.perf_counter()
        try:
            return read(*a)
        finally:
            SPANS.append((began, time.perf_counter()))

    return timed


def trace_summary() -> str:
    """' lat_ms L inflight C waits_s W nreads N' over SPANS and WAITS ('' without TRACE)."""
    if not TRACE or not SPANS:
        return ""
    busy = sum(e - b for b, e in SPANS)
    window = max(e for _, e in SPANS) - min(b for b, _ in SPANS)
    return (
        f" lat_ms {busy / len(SPANS) * 1e3:.3f} inflight {busy / window:.2f}"
        f" waits_s {sum(WAITS):.3f} nreads {len(SPANS)}"
        + "".join(
            f" {k}_ms {statistics.mean(v) * 1e3:.3f}/{sorted(v)[len(v) * 9 // 10] * 1e3:.3f}({len(v)})"
            for k, v in STAGES.items()
            if v
        )
        + (
            f" refills {len(REFILLS)} short {sum(1 for k, _ in REFILLS if k)}"
            f" short_mean {statistics.mean(k for k, _ in REFILLS):.2f}"
            f" copies_mean {statistics.mean(c for _, c in REFILLS):.2f}"
            if REFILLS
            else ""
        )
        + (  # the loading thread's time outside its reaps, over the reads' window: its own work
            f" reaps {len(REAPS)} per_reap {statistics.mean(n for _, n in REAPS):.2f}"
            f" busy {1 - sum(t for t, _ in REAPS) / window:.2f}"
            if REAPS
            else ""
        )
    )


def size(text: str) -> int:
    return int(text[:-1]) * {"K": 1024, "M": 1024 * 1024}[text[-1]]


def requests(files: list[str], r: int) -> list[tuple[int, int, int]]:
    """(file index, offset, length rounded up to 4 KiB) for every R-byte request, in file order."""
    out = []
    for i, f in enumerate(files):
        n = os.path.getsize(f)
        out += [(i, o, (min(r, n - o) + 4095) & ~4095) for o in range(0, n, r)]
    return out


def threaded(
    fds: list[int],
    work: list[tuple[int, int, int]],
    n: int,
    r: int,
    work_us: float = 0,
    places: int = 1,
    gpu: bool = False,
) -> int:
    """``n`` threads take the next request from one queue and read it into their own ``places`` R-byte
    places of huge pages, in turn; with ``gpu``, each place is pinned and the thread copies each read
    to the GPU on its own stream and waits for the copy before its next read."""
    lock = threading.Lock()
    it = iter(work)
    totals: list[int] = []
    preadv = traced(os.preadv) if TRACE else os.preadv
    if gpu:
        import torch

        starts, pos = {}, 0
        for i in sorted({w[0] for w in work}):
            starts[i], pos = pos, pos + os.fstat(fds[i]).st_size
        dst = torch.empty(pos + r, dtype=torch.uint8, device="cuda")

    def run() -> None:
        span = max(places * r, 4 << 20)  # whole 2 MiB pages, as the raw limit's 16 MiB
        buf = Mapping(None, span, huge=True)
        views = [buffer_at(buf.address + k * r, r) for k in range(places)]
        if gpu:
            torch.cuda.cudart().cudaHostRegister(buf.address, span, 0)
            host = torch.frombuffer(buffer_at(buf.address, span), dtype=torch.uint8)
            stream = torch.cuda.Stream()
        done = reads = 0
        while True:
            with lock:
                item = next(it, None)
            if item is None:
                break
            i, off, length = item
            k = reads % places
            got = preadv(fds[i], [views[k][:length]], off)
            done, reads = done + got, reads + 1
            if gpu:
                with torch.cuda.stream(stream):
                    dst[starts[i] + off : starts[i] + off + got].copy_(
                        host[k * r : k * r + got], non_blocking=True
                    )
                stream.synchronize()
            if work_us:
                end = time.perf_counter() + work_us / 1e6
                while time.perf_counter() < end:
                    pass
        if gpu:
            torch.cuda.cudart().cudaHostUnregister(buf.address)
        totals.append(done)

    pool = [threading.Thread(target=run) for _ in range(n)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(totals)


class Iocb(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("key", ctypes.c_uint32),
        ("rw_flags", ctypes.c_uint32),
        ("opcode", ctypes.c_uint16),
        ("reqprio", ctypes.c_int16),
        ("fildes", ctypes.c_uint32),
        ("buf", ctypes.c_uint64),
        ("nbytes", ctypes.c_uint64),
        ("offset", ctypes.c_int64),
        ("reserved2", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("resfd", ctypes.c_uint32),
    ]


class Event(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


def native_aio(fds: list[int], work: list[tuple[int, int, int]], q: int, r: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    sc = libc.syscall
    sc.restype = ctypes.c_long
    SETUP, DESTROY, GETEVENTS, SUBMIT = 206, 207, 208, 209  # x86_64
    ctx = ctypes.c_ulong(0)
    if sc(SETUP, ctypes.c_long(q), ctypes.byref(ctx)) < 0:
        raise OSError(ctypes.get_errno(), "io_setup")
    buf = Mapping(None, max(q * r, 4 << 20), huge=True)
    iocbs = (Iocb * q)()
    ptrs = (ctypes.POINTER(Iocb) * 1)()
    events = (Event * q)()
    it = iter(work)
    done = 0

    def submit(slot: int) -> bool:
        item = next(it, None)
        if item is None:
            return False
        i, off, length = item
        cb = iocbs[slot]
        ctypes.memset(ctypes.byref(cb), 0, ctypes.sizeof(cb))
        cb.data, cb.fildes, cb.buf, cb.nbytes, cb.offset = slot, fds[i], buf.address + slot * r, length, off
        ptrs[0] = ctypes.pointer(cb)
        if sc(SUBMIT, ctx, ctypes.c_long(1), ptrs) != 1:
            raise OSError(ctypes.get_errno(), "io_submit")
        return True

    try:
        inflight = sum(submit(s) for s in range(q))
        while inflight:
            got = sc(GETEVENTS, ctx, ctypes.c_long(1), ctypes.c_long(q), events, None)
            if got < 0:
                raise OSError(ctypes.get_errno(), "io_getevents")
            for e in events[:got]:
                if e.res < 0:
                    raise OSError(-e.res, "aio read")
                done += e.res
                inflight -= 1
                inflight += submit(e.data)
    finally:
        sc(DESTROY, ctx)
        buf.close()
    return done


def child(files: list[str], spec: str) -> None:
    """One timed run of ``spec``; its ``KEY=V`` words reached this process's environment from main."""
    kind, *args = spec.split()
    if "PROBE_SWITCH" in os.environ:  # the interpreter's switch interval, in seconds (default 0.005)
        sys.setswitchinterval(float(os.environ["PROBE_SWITCH"]))
    if kind in ("ft", "own"):
        import torch

        torch.empty(1, device="cuda")  # CUDA up before the clock, as in cold2.py
        torch.cuda.synchronize()
    run: Callable[[], int]
    if kind == "ft":
        import pathlib
        import queue

        from flashtensors.bench import loaders
        from flashtensors.engine import readers, ring_feeder

        if TRACE:
            readers.pread_full = traced(readers.pread_full)  # window.read's
            ring_feeder.pread_full = traced(ring_feeder.pread_full)

            # A slot's way back: a reader hands it over full (ready), the owner takes it and queues its
            # copy (take), the owner frees it once the copy is done (freed), a waiting reader gets it.
            ready: dict[int, float] = {}
            taken: dict[int, float] = {}
            freed: dict[int, float] = {}

            class StampedFull(queue.SimpleQueue):  # type: ignore[type-arg]
                def put(self, item: object, block: bool = True, timeout: float | None = None) -> None:
                    if isinstance(item, tuple):
                        ready[item[0].offset] = time.perf_counter()
                    super().put(item, block, timeout)

            class TimedLifo(queue.LifoQueue):  # type: ignore[type-arg]
                def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
                    now = time.perf_counter()
                    if item.offset in taken:
                        STAGES["in_owner"].append(now - taken.pop(item.offset))
                    freed[item.offset] = now
                    super().put(item, block, timeout)

                def get(self, block: bool = True, timeout: float | None = None) -> Any:
                    began = time.perf_counter()
                    slot = super().get(block, timeout)
                    now = time.perf_counter()
                    WAITS.append(now - began)
                    if now - began > 20e-6 and slot.offset in freed:  # it waited: how late it woke
                        STAGES["to_reader"].append(now - freed[slot.offset])
                    return slot

            take = ring_feeder.RingFeeder._take

            def timed_take(self: Any, item: Any) -> None:
                if isinstance(item, tuple) and item[0].offset in ready:
                    now = time.perf_counter()
                    STAGES["to_owner"].append(now - ready.pop(item[0].offset))
                    taken[item[0].offset] = now
                take(self, item)

            try:  # a tree with the native AIO feeder (branch next-lease/aio-feeder): each read from its
                # submission to its reaping
                from flashtensors.engine import aio

                submit, reap, sent = aio.Aio.submit, aio.Aio.reap, {}

                def timed_submit(self: Any, reads: list[Any]) -> None:
                    now = time.perf_counter()
                    sent.update((r[0], now) for r in reads)
                    submit(self, reads)

                def timed_reap(self: Any, least: int = 1) -> list[tuple[int, int]]:
                    began = time.perf_counter()
                    got = reap(self, least)
                    now = time.perf_counter()
                    REAPS.append((now - began, len(got)))
                    SPANS.extend((sent.pop(tag), now) for tag, _ in got)
                    return got

                aio.Aio.submit, aio.Aio.reap = timed_submit, timed_reap

                from flashtensors.engine import aio_feeder

                refill = aio_feeder.AioFeeder._submit

                def counted_refill(self: Any) -> None:
                    # after each refill: reads left short of `depth` for want of an idle slot, and the
                    # slots whose copies were queued and not yet seen done
                    refill(self)
                    if self._more:
                        REFILLS.append((self._depth - len(self._pending), len(self._inflight)))

                aio_feeder.AioFeeder._submit = counted_refill
            except ImportError:  # a tree without it
                pass

            ring_feeder.queue.LifoQueue = TimedLifo  # type: ignore[misc]
            ring_feeder.queue.SimpleQueue = StampedFull  # type: ignore[misc]
            ring_feeder.RingFeeder._take = timed_take  # type: ignore[method-assign]

        target = loaders.Target(pathlib.Path(files[0]).parent, tuple(pathlib.Path(f) for f in files))

        def run() -> int:
            loaders._flashtensors(target, "cuda")
            torch.cuda.synchronize()
            return sum(os.path.getsize(f) for f in files)

    else:
        fds = [os.open(f, os.O_RDONLY | os.O_DIRECT) for f in files]
        n, r = int(args[0]), size(args[1])
        work = requests(files, r)
        if kind == "own":
            run = functools.partial(threaded, fds, work, n, r, gpu=True)
        elif kind == "thr":
            run = functools.partial(
                threaded, fds, work, n, r, float(args[2]), int(args[3]) if len(args) > 3 else 1
            )
        else:
            run = functools.partial(native_aio, fds, work, n, r)
    s = time.perf_counter()
    got = run()
    print("T", time.perf_counter() - s, got, trace_summary() + native_summary())


def native_summary() -> str:
    """The C loop's own counts (engine/native.py), where this run's load took it. ``waits_s`` and
    ``per_batch`` were its copier's, and come only from trees older than the copier's removal."""
    st = getattr(sys.modules.get("flashtensors.engine.native"), "last_stats", None)
    if st is None or not st.reads:
        return ""
    window = max(st.last_read - st.first_read, 1e-9)
    return (
        f" native lat_ms {st.read_s / st.reads * 1e3:.3f} inflight {st.read_s / window:.2f}"
        + (f" waits_s {st.slot_wait_s:.3f}" if hasattr(st, "slot_wait_s") else "")
        + f" nreads {st.reads}"
        + (f" per_batch {st.copies / max(1, st.batches):.2f}" if hasattr(st, "batches") else "")
        + (f" pin_ms {st.pin_s * 1e3:.1f}" if hasattr(st, "pin_s") else "")
    )


def main() -> None:
    d, rounds, specs = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
    files = sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors"))
    total = sum(os.path.getsize(f) for f in files)
    res: dict[str, list[float]] = {k: [] for k in specs}
    for rep in range(rounds):
        for spec in specs[rep % len(specs) :] + specs[: rep % len(specs)]:
            drop_cache(files, "drop_caches")
            settings = dict(a.split("=", 1) for a in spec.split()[1:] if "=" in a)  # FLASH_*, PROBE_SRC
            env = {**os.environ, **settings}
            p = subprocess.run(
                [sys.executable, __file__, "--child", d, spec], capture_output=True, text=True, env=env
            )
            lines = [x for x in p.stdout.splitlines() if x.startswith("T ")]
            if not lines:
                print(spec, "FAILED", p.stderr[-600:], flush=True)
                continue
            seconds, got = float(lines[-1].split()[1]), int(lines[-1].split()[2])
            if got < total:
                print(spec, f"SHORT {got} of {total}", flush=True)
            res[spec].append(round(total / seconds / 1e9, 3))
            print(rep, spec, res[spec][-1], " ".join(lines[-1].split()[3:]), flush=True)
    print(
        "AIO " + json.dumps({k: [statistics.median(v) if v else None, v] for k, v in res.items()}), flush=True
    )


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        d = sys.argv[2]
        child(sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors")), sys.argv[3])
    else:
        main()
