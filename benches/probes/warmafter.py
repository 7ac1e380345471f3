"""A small warm load after a cold one, in one process (perf-notes, fourteenth session, Open 3): does the
warm load still read its tail through the staging ring, and how fast is it?
python warmafter.py DIR ROUNDS   (PROBE_SRC: another tree's src, e.g. .probe/fifo/src)

Steps: drop the files from the page cache; one cold load (O_DIRECT through the ring); read the files
into the page cache (buffered, sequential); then ROUNDS warm loads (read path auto), each timed. Prints
the ring's pinned slots after the cold load, whether the ring counts as ready, and per warm load its
GB/s and the files' paths ("pinned-mmap+buffered" where the ring read a tail)."""
import os, statistics, sys
sys.path.insert(0, os.environ.get("PROBE_SRC", "src"))
import torch
from flashtensors.bench.cache import drop_cache
from flashtensors.config import get_settings
from flashtensors.engine import staging
from flashtensors.engine.api import load

D, rounds = sys.argv[1], int(sys.argv[2])
files = sorted(os.path.join(D, f) for f in os.listdir(D) if f.endswith(".safetensors"))
drop_cache(files, "drop_caches")
cold = load(D, device="cuda", read_path="direct")
torch.cuda.synchronize()
print(f"cold {cold.stats.gbps:.2f} GB/s {sorted(set(cold.stats.paths.values()))}", flush=True)
del cold
rings = [r[1] if isinstance(r, tuple) else r for r in staging._rings.values()]  # (made for, ring) since s15
pinned = [sum(s.pinned for s in r.slots) for r in rings]
print(f"ring slots pinned {pinned} of {[len(r.slots) for r in rings]}; ready {staging.ring_is_ready(get_settings())}")
for f in files:  # into the page cache, sequentially (2 MiB folios)
    with open(f, "rb") as fh:
        while fh.read(64 * 2**20):
            pass
speeds = []
for k in range(rounds):
    warm = load(D, device="cuda")
    torch.cuda.synchronize()
    speeds.append(round(warm.stats.gbps, 2))
    print(f"warm {k} {speeds[-1]} GB/s {sorted(set(warm.stats.paths.values()))}", flush=True)
    del warm
print("WARMAFTER", os.environ.get("PROBE_SRC", "src"), statistics.median(speeds), speeds, flush=True)
