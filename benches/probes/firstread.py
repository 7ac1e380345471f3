"""Where a cold load's time before its first read goes, in a fresh process, cache dropped:
python firstread.py DIR [ROUNDS]          (GPU; FLASH_NATIVE_READS=0 times the Python loop instead)
PROBE_SRC=path/to/other/src python firstread.py ...   loads with another tree's engine

Each round is a fresh process with a CUDA context made before the clock, as in the bench's workers. The
engine calls made before the first read are wrapped, and each one's start and end are printed in ms from
``api.load``'s start, with the first read's start (``stats.reads``). Calls the load does not make (the C
loop's, with FLASH_NATIVE_READS=0) are simply absent. The twenty-first session asked this: the C loop's
first read came 41-47 ms after the load's start, whether its slots were pinned up front or at their
first copy, where the Python loop's came after 10-20 ms (eighteenth session)."""

import json, os, subprocess, sys, time

D = sys.argv[1]
if sys.argv[2:3] != ["child"]:
    for r in range(int(sys.argv[2]) if len(sys.argv) > 2 else 3):
        out = subprocess.run([sys.executable, __file__, D, "child"], capture_output=True, text=True)
        print(out.stdout.strip() or out.stderr[-2000:], flush=True)
    raise SystemExit(0)

sys.path.insert(0, os.environ.get("PROBE_SRC", "src"))
import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: only to try the probe itself
if DEV == "cuda":
    torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
from flashtensors.bench.cache import drop_cache
from flashtensors.engine import api, devices, native
from flashtensors.engine.plan import resolve_files

spans = []  # (name, began, ended), perf_counter seconds
def wrap(owner, name, label=None):
    real = getattr(owner, name)
    def timed(*a, **k):
        b = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            spans.append((label or name, b, time.perf_counter()))
    setattr(owner, name, timed)

wrap(api, "make_plan"); wrap(api, "warm_views"); wrap(devices, "allocate_arena")
for n in ("library", "open_direct", "staging_ring", "pooled_stream", "read_regions"):
    if hasattr(native, n):
        wrap(native, n, "native." + n)
if hasattr(native, "read_ring"):
    wrap(native, "read_ring", "native.read_ring")
try:  # the head start (twenty-second session): how long the load's take waited for it
    from flashtensors.engine import events
    wrap(events, "take", "events.take"); wrap(events, "head_start", "events.head_start")
except ImportError:
    pass
for n in ("entry_points", "create_event"):
    if hasattr(devices, "_Runtime") and hasattr(devices._Runtime, n):
        wrap(devices._Runtime, n, "rt." + n)

files = [str(f) for f in resolve_files(D)]
drop_cache(files)
real_clock = time.perf_counter
began = []
def load():
    began.append(real_clock())
    return api.load(D, device=DEV)
res = load()
t0 = began[0]
first = res.stats.reads[0] if res.stats.reads else None
agg = {}
for name, b, e in spans:
    a = agg.setdefault(name, [0, 0.0, None, None])
    a[0] += 1; a[1] += e - b
    a[2] = b if a[2] is None else min(a[2], b); a[3] = e if a[3] is None else max(a[3], e)
out = {n: {"n": a[0], "ms": round(a[1] * 1e3, 2), "from": round((a[2] - t0) * 1e3, 2), "to": round((a[3] - t0) * 1e3, 2)}
       for n, a in sorted(agg.items(), key=lambda kv: kv[1][2])}
st = native.last_stats
print("FIRSTREAD " + json.dumps({"first_read_ms": round(first * 1e3, 2) if first is not None else None,
                                 "load_s": round(res.stats.seconds, 3), "paths": sorted(set(res.stats.paths.values())),
                                 "pin_ms": round(st.pin_s * 1e3, 2) if st is not None and hasattr(st, "pin_s") else None,
                                 "spans": out}), flush=True)
