"""Cold reads in one process, ours against raw O_DIRECT, the cache dropped before each:
python coldwin.py DIR [ROUNDS] [ORDER]   (ORDER: comma-separated raw / ft, default raw,ft,raw,ft,raw,ft)
PROBE_SRC=path/to/other/src python coldwin.py ...   loads with another tree's engine
PREFAULT=1 python coldwin.py ...   faults the staging ring in (without pinning it) before the first step
PRIME=first python coldwin.py ...   runs the copy path's first use (streams.prime_copies) on the clock,
                                    before the first load starts its reads
VIEWS=after python coldwin.py ...   builds the tensor views after the reads, not while they fly
Every "ft" step also reports, per engine call made on the loading thread (``main``: count, total ms,
longest ms), where it holds the GIL the readers need between their reads.

Each round is a fresh process with a CUDA context made before the first step. "raw" is the bench's disk
limit (8 threads x 16 MiB O_DIRECT into huge-page buffers made before its clock); "ft" is the engine's
load to cuda:0, with the window of its file reads (``stats.reads``). The first "ft" of a process pays the
staging ring's first use (faulting its slots in, pinning them, the first copies); later ones find it
ready. So the steps tell apart a cost of the first use from one of the read loop itself, and the raw
reads beside them say what the disk did meanwhile."""
import json, os, resource, subprocess, sys, time

D = sys.argv[1]
if sys.argv[2:3] != ["child"]:
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    order = sys.argv[3] if len(sys.argv) > 3 else "raw,ft,raw,ft,raw,ft"
    for r in range(rounds):
        out = subprocess.run([sys.executable, __file__, D, "child", order], capture_output=True, text=True)
        print(out.stdout.strip() or out.stderr[-2000:], flush=True)
    raise SystemExit(0)

sys.path.insert(0, os.environ.get("PROBE_SRC", "src"))
import torch
torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
from flashtensors.bench.cache import chunks, drop_cache, timed_parallel_read
from flashtensors.engine import api, readers
import threading
from flashtensors.engine.plan import resolve_files

reads = []  # (thread, begin, end) of every file read of a load
real = readers.pread_full
def timed(fd, view, offset):
    b = time.perf_counter(); n = real(fd, view, offset); reads.append((threading.get_ident(), b, time.perf_counter())); return n
readers.pread_full = timed

def gaps():
    """Per read: how long it took; between a thread's reads: how long it spent outside them (ms means).
    The first reads into each slot (the first 16 of the load) are shown apart."""
    by = {}
    for t, b, e in sorted(reads, key=lambda x: x[1]):
        by.setdefault(t, []).append((b, e))
    gap = [b2 - e1 for rs in by.values() for (_, e1), (b2, _) in zip(rs, rs[1:])]
    dur = [e - b for _, b, e in sorted(reads, key=lambda x: x[1])]
    m = lambda xs: round(1e3 * sum(xs) / len(xs), 2) if xs else None
    return dict(threads=len(by), read_ms_first16=m(dur[:16]), read_ms_rest=m(dur[16:]), gap_ms=m(gap),
                gap_ms_max=round(1e3 * max(gap), 1) if gap else None)

main = {}  # name -> [calls, total s, longest s], calls on the loading thread during a load
def traced(name, fn):
    def run(*a, **k):
        b = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            d = time.perf_counter() - b
            m = main.setdefault(name, [0, 0.0, 0.0]); m[0] += 1; m[1] += d; m[2] = max(m[2], d)
    return run
from flashtensors.engine import ring_feeder, devices
api._views = traced("views", api._views)
for name in ("make_streams", "prime_copies", "pooled_stream", "staging_ring"):
    if hasattr(ring_feeder, name):
        setattr(ring_feeder, name, traced(name, getattr(ring_feeder, name)))
if hasattr(ring_feeder, "RingFeeder"):
    ring_feeder.RingFeeder._take = traced("take", ring_feeder.RingFeeder._take)
    ring_feeder.RingFeeder.__init__ = traced("feeder_init", ring_feeder.RingFeeder.__init__)
devices.allocate_arena = traced("allocate_arena", devices.allocate_arena)
for name in ("make_plan", "warm_views", "residency", "resolve_files"):  # before the reads, on this thread
    if hasattr(api, name):
        setattr(api, name, traced(name, getattr(api, name)))
if os.environ.get("VIEWS") == "after":  # the load builds its views after the reads
    api._once = lambda fn: None

if os.environ.get("PREFAULT"):  # the staging ring faulted in before the first step (not pinned)
    from flashtensors.config import get_settings
    from flashtensors.engine.staging import staging_ring
    from flashtensors.engine.sysio import MADV_POPULATE_WRITE
    staging_ring(get_settings()).buffer.mapping.advise(MADV_POPULATE_WRITE)

files = [str(f) for f in resolve_files(D)]
total = sum(os.path.getsize(f) for f in files)
steps = []
for kind in sys.argv[3].split(","):
    drop_cache(files, "drop_caches")
    if kind == "raw":
        got, sec = timed_parallel_read(chunks(files), 8, direct=True)
        steps.append(dict(kind="raw", s=round(sec, 4), GBs=round(got / sec / 1e9, 3)))
        continue
    torch.cuda.synchronize()
    reads.clear(); main.clear()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    s = time.perf_counter()
    if os.environ.get("PRIME") == "first":  # the copy path's first use before the load, on the clock
        from flashtensors.engine import streams
        streams.prime_copies(torch.device("cuda", 0), 2)
    r = api.load(D, device="cuda")
    torch.cuda.synchronize()
    el = time.perf_counter() - s
    ru2 = resource.getrusage(resource.RUSAGE_SELF)
    faults = dict(majflt=ru2.ru_majflt - ru.ru_majflt, minflt=ru2.ru_minflt - ru.ru_minflt)
    if getattr(r.stats, "reads", None) is not None:
        first, last = r.stats.reads
    else:  # a tree from before stats.reads (PROBE_SRC): the same window, from the reads timed here
        first, last = min(b for _, b, _ in reads) - s, max(e for _, _, e in reads) - s
    steps.append(dict(kind="ft", s=round(el, 4), GBs=round(total / el / 1e9, 3),
                      reads_GBs=round(total / (last - first) / 1e9, 3),
                      before_ms=round(first * 1e3, 1), after_ms=round((el - last) * 1e3, 1), **gaps(), **faults,
                      main={k: [c, round(t * 1e3, 1), round(x * 1e3, 1)] for k, (c, t, x) in main.items()}))
    del r
print("COLDWIN " + json.dumps(steps), flush=True)
