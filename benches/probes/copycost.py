"""What the copies to the GPU cost a cold read: python copycost.py DIR [ROUNDS] [KINDS]

Each round runs every kind below in rotation, each in a fresh process with the page cache dropped first (as
the bench's cold runs are), and prints GB/s over the checkpoint's shard bytes:

* ``raw``: the bench's disk limit, 16 threads reading 512 KiB O_DIRECT requests in file order, each into
  its own 16 MiB buffer of huge pages (``bench.cache.timed_parallel_read``);
* ``raw+copy4M`` / ``raw+copy32M``: the same reads, while this process's main thread copies a pinned buffer
  of other bytes to the GPU at the reads' pace (one 4 MiB or 32 MiB copy per 4 MiB or 32 MiB read so far,
  on a side stream, waited for with an event): DMA to the GPU at the rate a loader must make it, with the
  read path left exactly as the limit's;
* ``raw+flood``: the same reads while the main thread copies 32 MiB pieces to the GPU back to back, as
  fast as the link goes (the most such traffic can cost the reads);
* ``raw@start``: the raw read of each file from where our load's reads start (the header's end, rounded
  down to 4 KiB), so that no request starts on a multiple of 512 KiB;
* ``ft``: our cold load (defaults: 16 readers, 512 KiB pieces into 4 MiB slots, copies queued by the
  loading thread);
* ``ft-nocopy``: the same load with the copies left out (``devices.copy_to_device`` made a no-op that says
  it copied): our read path's cost alone. Its tensors hold garbage; only its time counts.

In the sixteenth session an engine change whose claims ended on multiples of the slot size (so each
512 KiB piece started on a multiple of 512 KiB, as ``raw``'s do) ran level with ours, and ``raw@start``
level with ``raw`` (docs/perf-notes.md): starting at the header's end costs nothing on these disks, so
the change was dropped.

Prints one line per run and, last, ``COPYCOST {kind: [median, [runs]]}``.
"""
import json, os, statistics, subprocess, sys, threading, time

KINDS = ["raw", "raw+copy4M", "raw+copy32M", "raw+flood", "ft", "ft-nocopy"]
PIECE = 512 * 1024
M = 1024**2

D = sys.argv[1]
if sys.argv[2:3] != ["child"]:
    sys.path.insert(0, os.environ.get("PROBE_SRC", "src"))
    from flashtensors.bench.cache import drop_cache
    from flashtensors.engine.plan import resolve_files

    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    kinds = sys.argv[3].split(",") if len(sys.argv) > 3 else KINDS
    files = [str(f) for f in resolve_files(D)]
    res = {k: [] for k in kinds}
    for r in range(rounds):
        order = kinds[r % len(kinds):] + kinds[: r % len(kinds)]
        for kind in order:
            drop_cache(files, "drop_caches")
            out = subprocess.run([sys.executable, __file__, D, "child", kind], capture_output=True, text=True)
            got = [l for l in out.stdout.splitlines() if l.startswith("GBS ")]
            if not got:
                print(r, kind, "FAILED", out.stderr[-1500:], flush=True)
                continue
            res[kind].append(float(got[-1].split()[1]))
            print(r, kind, got[-1][4:], flush=True)
    print("COPYCOST " + json.dumps({k: [statistics.median(v) if v else None, v] for k, v in res.items()}), flush=True)
    raise SystemExit(0)

sys.path.insert(0, os.environ.get("PROBE_SRC", "src"))
import torch

torch.cuda.init()
torch.empty(1, device="cuda")
torch.cuda.synchronize()
from flashtensors.engine import devices
from flashtensors.engine.plan import resolve_files
from flashtensors.bench.cache import CHUNK
from flashtensors.engine.sysio import Mapping, buffer_at

kind = sys.argv[3]
files = [str(f) for f in resolve_files(D)]
total = sum(os.path.getsize(f) for f in files)

if kind.startswith("ft"):
    from flashtensors.engine.api import load

    if kind == "ft-nocopy":
        devices.copy_to_device = lambda *a: True
    s = time.perf_counter()
    result = load(D, device="cuda")
    torch.cuda.synchronize()
    sec = time.perf_counter() - s
    print(f"GBS {total / sec / 1e9:.3f} {sec:.3f} s paths {sorted(set(result.stats.paths.values()))}", flush=True)
    raise SystemExit(0)

# The raw read, as the bench's timed_parallel_read does it, with a count of the bytes read so far.
start = {f: 0 for f in files}
if kind == "raw@start":  # from where our load's reads start: the header's end, rounded down to 4 KiB
    from pathlib import Path

    from flashtensors.engine.plan import make_plan

    start = {str(r.header.path): r.file_start for r in make_plan([Path(f) for f in files]).regions}
    print("starts", start, flush=True)
work = [(f, o, min(PIECE, os.path.getsize(f) - o)) for f in files for o in range(start[f], os.path.getsize(f), PIECE)]
fds = {f: os.open(f, os.O_RDONLY | os.O_DIRECT) for f in files}
bufs = [Mapping(None, CHUNK, huge=True) for _ in range(16)]  # faulted in, as the limit's buffers are
it = iter(work)
lock = threading.Lock()
done = [0]
cond = threading.Condition()
running = [16]


def reader(buf):
    view = buffer_at(buf.address, PIECE)
    while True:
        with lock:
            item = next(it, None)
        if item is None:
            break
        f, o, n = item
        got = min(os.preadv(fds[f], [view[: (n + 4095) & ~4095]], o), n)
        with cond:
            done[0] += got
            cond.notify()
    with cond:
        running[0] -= 1
        cond.notify()


step = {"raw+copy4M": 4 * M, "raw+copy32M": 32 * M, "raw+flood": 32 * M}.get(kind, 0)
if step:
    src = torch.empty(step, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(step, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)  # the copy path's first use, before the clock
    stream.synchronize()
threads = [threading.Thread(target=reader, args=(b,), daemon=True) for b in bufs]
copied = 0
s = time.perf_counter()
for t in threads:
    t.start()
if step:
    with torch.cuda.stream(stream):
        while True:
            with cond:
                if kind != "raw+flood":
                    while running[0] and done[0] - copied < step:
                        cond.wait()
                if not running[0] and (kind == "raw+flood" or done[0] - copied < step):
                    break
            dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
            ev.synchronize()
            copied += step
for t in threads:
    t.join()
sec = time.perf_counter() - s
print(f"GBS {done[0] / sec / 1e9:.3f} {sec:.3f} s copied {copied / 1e9:.2f} GB", flush=True)
