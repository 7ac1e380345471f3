"""Is the first pin of freshly cached pages slower than later pins, and do pages migrate meanwhile?
python firstpin.py DIR   (evicts and refills the page cache of DIR's files twice: sequential, scattered)"""
import os, subprocess, sys, time
sys.path.insert(0, "src")
import torch
from flashtensors.bench.cache import chunks, drop_cache, parallel_read
from flashtensors.engine import devices
from flashtensors.engine.sysio import Mapping

D = sys.argv[1]
files = sorted(os.path.join(D, f) for f in os.listdir(D) if f.endswith(".safetensors"))
total = sum(os.path.getsize(f) for f in files)
torch.cuda.init(); torch.empty(1, device="cuda")


def vmstat():
    out = {}
    for line in open("/proc/vmstat"):
        k, v = line.split()
        if k.startswith(("pgmigrate", "thp_", "nr_foll_pin")):
            out[k] = int(v)
    return out


def pin_all():
    maps = [Mapping(f, os.path.getsize(f)) for f in files]
    t = time.perf_counter()
    for m in maps:
        devices.host_register(m.address, m.length)
    el = time.perf_counter() - t
    for m in maps:
        devices.host_unregister(m.address)
        m.close()
    return total / el / 1e9


zones = [l.split()[-1] for l in open("/proc/zoneinfo") if l.startswith("Node")]
print("zones", zones, flush=True)
for fill in ("sequential", "scattered"):
    drop_cache(files, "drop_caches")
    if fill == "sequential":
        for f in files:
            subprocess.run(["cat", f], stdout=subprocess.DEVNULL, check=True)
    else:
        parallel_read(chunks(files), 16)
    for i in range(3):
        before = vmstat()
        rate = pin_all()
        after = vmstat()
        moved = {k: after[k] - before[k] for k in after if after[k] != before.get(k)}
        print(f"FIRSTPIN {fill} pin#{i + 1} {rate:.1f} GB/s  vmstat delta {moved}", flush=True)
