"""Where a warm (or cold) load's time goes, in a fresh process: python warmph.py DIR [ROUNDS] [cold] [ring]
Each round is a new process (CUDA context made before the clock, files cached by the parent), which loads
twice: the first load pays the process's one-off costs, the second shows what stays. Prints, per load, the
start and end (ms from the load's start) of every phase the engine goes through. With "cold", the page
cache is dropped before each load, and the first and last file reads are shown as phases too. With "ring",
a warm load of any size reads its tail through the staging ring (RING_MIN_BYTES = 0): the ring's first use
in the process (its slots' first reads and pins, its first copies) shows as phases."""
import json, os, subprocess, sys, time

D = sys.argv[1]
COLD = "cold" in sys.argv[3:]
RING = "ring" in sys.argv[3:]
if sys.argv[2:3] != ["child"]:
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    files = sorted(os.path.join(D, f) for f in os.listdir(D) if f.endswith(".safetensors"))
    for f in files:  # sequential fill, as a download leaves it
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    for r in range(rounds):
        out = subprocess.run([sys.executable, __file__, D, "child"] + (["cold"] if COLD else []) + (["ring"] if RING else []),
                             capture_output=True, text=True)
        print(out.stdout.strip() or out.stderr[-2000:], flush=True)
    raise SystemExit(0)

import threading
sys.path.insert(0, os.environ.get("PROBE_SRC", "src"))  # PROBE_SRC: another tree's src, e.g. a branch
import torch
torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
from flashtensors.engine import api, devices, pinned_mmap, readers, ring_feeder
from flashtensors.engine.plan import resolve_files

files = resolve_files(D)
total = sum(os.path.getsize(f) for f in files)
T = [0.0]
events: list = []
lock = threading.Lock()


def wrap(mod, name, label=None):
    orig = getattr(mod, name)

    def w(*a, **k):
        s = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            e = time.perf_counter()
            with lock:
                events.append((label or name, round((s - T[0]) * 1e3, 2), round((e - T[0]) * 1e3, 2)))

    setattr(mod, name, w)


for mod, name in [(api, "make_plan"), (api, "resolve_files"), (devices, "allocate_arena"), (api, "_views"),
                  (api, "_relocate"), (readers, "side_stream"), (pinned_mmap, "side_stream"),
                  (pinned_mmap, "Mapping"), (pinned_mmap, "wait_for_releases"), (devices, "host_register"),
                  (ring_feeder, "read_through_ring"), (ring_feeder, "prime_copies"), (pinned_mmap, "_release_later"),
                  (ring_feeder, "staging_ring"), (ring_feeder, "open_direct"), (readers, "_run_parallel"),
                  (readers, "pread_full")]:
    wrap(mod, name)
for name in ("__init__", "_take", "finish"):  # the ring feeder's phases
    wrap(ring_feeder.RingFeeder, name, "ring." + name.strip("_"))
wrap(devices.PinnedBuffer, "prepare", "slot.prepare")
if RING:
    pinned_mmap.RING_MIN_BYTES = 0
from flashtensors.bench.cache import drop_cache
res = []
for i in range(2):
    events.clear()
    if COLD:
        drop_cache(files, "drop_caches")
    torch.cuda.synchronize()
    T[0] = time.perf_counter()
    r = api.load(D, device="cuda")
    el = time.perf_counter() - T[0]
    regs = [e for e in events if e[0] == "host_register"]
    reads = sorted(e for e in events if e[0] == "pread_full")
    other = [e for e in events if e[0] not in ("host_register", "pread_full")]
    if reads:
        last = max(reads, key=lambda e: e[2])
        other += [("first read", reads[0][1], reads[0][2]), ("last read", last[1], last[2])]
    res.append(dict(load=i + 1, ms=round(el * 1e3, 2), GBs=round(total / el / 1e9, 2),
                    paths=sorted(set(r.stats.paths.values())), phases=other,
                    pins=[(s, e) for _, s, e in regs]))
    del r
    pinned_mmap.wait_for_releases()
print("WARMPH " + json.dumps(res), flush=True)
