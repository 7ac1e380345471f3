"""One fresh-process load with phase timers: python fresh.py DIR MODE [key=value settings...]"""
import json, os, sys, time, subprocess
T0 = time.perf_counter()
import torch
sys.path.insert(0, "src")
import flashtensors as ft
from flashtensors.engine import api, devices, pinned_mmap, readers, ring_feeder, plan as planmod, sysio, pinned
D, mode = sys.argv[1], sys.argv[2]
kw = {}
for a in sys.argv[3:]:
    k, v = a.split("=")
    kw[k] = float(v) if "." in v else int(v)
torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
import_s = time.perf_counter() - T0
files = sorted(os.path.join(D, f) for f in os.listdir(D) if f.endswith(".safetensors"))
total = sum(os.path.getsize(f) for f in files)
for f in files:
    subprocess.run(["cat", f], stdout=subprocess.DEVNULL)
if kw: ft.configure(**kw)
ph = {}
START = time.perf_counter()
def wrap(mod, name, key):
    orig = getattr(mod, name)
    def w(*a, **k):
        s = time.perf_counter()
        try: return orig(*a, **k)
        finally:
            e = time.perf_counter() - s
            ph[key] = ph.get(key, 0) + e
            ph[key + "#n"] = ph.get(key + "#n", 0) + 1
            if key + "@first" not in ph:
                ph[key + "@first"] = round(e, 4); ph[key + "@t"] = round(s - START, 4)
    setattr(mod, name, w)
wrap(api, "make_plan", "plan"); wrap(api, "resolve_files", "resolve")
wrap(devices, "allocate_arena", "arena"); wrap(ring_feeder, "staging_ring", "ring")
wrap(devices, "host_register", "register"); wrap(readers, "side_stream", "stream"); wrap(pinned_mmap, "side_stream", "stream")
wrap(api, "residency", "residency"); wrap(api, "_views", "views")
wrap(pinned_mmap, "read_pinned_mmap", "pinmmap"); wrap(ring_feeder, "read_through_ring", "ringread")
wrap(readers, "read_pinned", "readpinned")
rp = None
if mode == "pinned-mmap-pop":
    from concurrent.futures import ThreadPoolExecutor
    import threading
    orig_pm = pinned_mmap.read_pinned_mmap
    POP = ThreadPoolExecutor(8)
    def _unused(regions, arena, settings):
        orig_reg = devices.host_register
        futs = {}
        for region in regions:
            m = sysio.Mapping(region.path, region.file_end)
            keep.append(m)
        # populate each file's mapping ahead in 256 MiB pieces; the engine maps again, so populate the
        # page tables of the engine's own mapping instead: hook Mapping creation
        return orig_pm(regions, arena, settings)
    keep = []
    OrigMapping = pinned_mmap.Mapping
    class PopMapping(OrigMapping):
        def __init__(self, path, size):
            super().__init__(path, size)
            self.futs = {}
            piece = 256 * 2**20
            for i in range(0, self.length, piece):
                self.futs[i] = POP.submit(sysio._libc.madvise, self.address + i, min(piece, self.length - i), 22)
    pinned_mmap.Mapping = PopMapping
    def reg(address, nbytes, _o=devices.host_register):
        return _o(address, nbytes)
    rp = "pinned-mmap"
elif mode == "hot":
    ft.configure(mem_pool_size=int(total * 1.05) + 2**30); ft.pin(files)
elif mode != "auto":
    rp = mode
torch.cuda.synchronize()
START = time.perf_counter()
r = api.load(D, device="cuda", read_path=rp)
torch.cuda.synchronize()
el = time.perf_counter() - START
out = {"mode": mode, "kw": kw, "s": round(el, 3), "GBs": round(total / el / 1e9, 2),
       "paths": sorted(set(r.stats.paths.values())), "import_s": round(import_s, 2)}
out.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in ph.items()})
# same-process second load for contrast
del r; torch.cuda.empty_cache(); pinned_mmap.wait_for_releases()
s = time.perf_counter(); r = api.load(D, device="cuda", read_path=rp); torch.cuda.synchronize()
out["second_GBs"] = round(total / (time.perf_counter() - s) / 1e9, 2)
del r; torch.cuda.empty_cache()
# raw costs in this process
s = time.perf_counter(); x = torch.empty(total, dtype=torch.uint8, device="cuda"); torch.cuda.synchronize(); out["cudamalloc_again_s"] = round(time.perf_counter() - s, 4)
print("PROBE " + json.dumps(out), flush=True)
