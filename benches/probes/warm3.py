"""Warm loads from a sequentially filled page cache: fresh-process loads with FLASH_* variants in
rotation, then (in this process) registration alone vs registration with DMA, by piece size.
python warm3.py DIR ROUNDS [NAME=ENV,ENV ...]   e.g. 2G=FLASH_REGISTER_CHUNK=2G"""
import json, os, statistics, subprocess, sys, time
sys.path.insert(0, "src")
import torch
from flashtensors.bench.cache import drop_cache
from flashtensors.engine import devices
from flashtensors.engine.sysio import Mapping, align_up

D, rounds = sys.argv[1], int(sys.argv[2])
configs = {"default": {}}
for arg in sys.argv[3:]:
    name, envs = arg.split("=", 1)
    configs[name] = dict(e.split("=", 1) for e in envs.split(","))
files = sorted(os.path.join(D, f) for f in os.listdir(D) if f.endswith(".safetensors"))
total = sum(os.path.getsize(f) for f in files)
drop_cache(files, "drop_caches")
t = time.perf_counter()
for f in files:
    subprocess.run(["cat", f], stdout=subprocess.DEVNULL, check=True)
print(f"fill {total / (time.perf_counter() - t) / 1e9:.2f} GB/s", flush=True)
CHILD = r'''
import sys, time, torch
sys.path.insert(0, "src")
from flashtensors.engine import api, devices
torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
reg = [0.0, 0]
orig = devices.host_register
def timed(a, n):
    s = time.perf_counter(); orig(a, n); reg[0] += time.perf_counter() - s; reg[1] += 1
devices.host_register = timed
s = time.perf_counter(); r = api.load(sys.argv[1], device="cuda"); torch.cuda.synchronize()
print("T", time.perf_counter() - s, reg[0], reg[1], ",".join(sorted(set(r.stats.paths.values()))))
'''
res = {k: [] for k in configs}
names = list(configs)
for rep in range(rounds):
    for name in names[rep % len(names):] + names[:rep % len(names)]:
        p = subprocess.run([sys.executable, "-c", CHILD, D], env={**os.environ, **configs[name]},
                           capture_output=True, text=True)
        line = [l for l in p.stdout.splitlines() if l.startswith("T ")]
        if not line:
            print(name, "FAILED", p.stderr[-600:], flush=True)
            continue
        _, el, rs, rn, paths = line[-1].split()
        el, rs = float(el), float(rs)
        res[name].append(round(total / el / 1e9, 2))
        print(f"{rep} {name:10s} {el:.3f} s {total / el / 1e9:6.2f} GB/s  register {rs:.3f} s in {rn} calls "
              f"({total / rs / 1e9 if rs else 0:.1f} GB/s)  {paths}", flush=True)
print("WARM " + json.dumps({k: (statistics.median(v) if v else None, v) for k, v in res.items()}), flush=True)

# Registration alone, and with each piece DMAed as soon as it is pinned, by piece size.
torch.cuda.init()
arena = torch.empty(total + 4096 * len(files), dtype=torch.uint8, device="cuda")
stream = torch.cuda.Stream()
G = 1024**3
for piece in (G, 2 * G, 1 << 40):
    for dma in (False, True):
        for _ in range(2):
            maps = [Mapping(f, os.path.getsize(f)) for f in files]
            pinned, reg = [], 0.0
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst = 0
            with torch.cuda.stream(stream):
                for m in maps:
                    off = 0
                    while off < m.size:
                        n = min(piece, m.size - off)
                        s = time.perf_counter()
                        devices.host_register(m.address + off, align_up(n, 4096))
                        reg += time.perf_counter() - s
                        pinned.append(m.address + off)
                        if dma:
                            arena[dst:dst + n].copy_(devices.host_view(m.address + off, n), non_blocking=True)
                        dst += n
                        off += n
            stream.synchronize()
            el = time.perf_counter() - t0
            for a in pinned:
                devices.host_unregister(a)
            for m in maps:
                m.close()
            print(f"MATRIX piece {'file' if piece > 4 * G else piece // G}G dma={int(dma)} total {el:.3f} s "
                  f"{total / el / 1e9:.1f} GB/s  register {reg:.3f} s ({total / reg / 1e9:.1f} GB/s, {len(pinned)} calls)",
                  flush=True)
