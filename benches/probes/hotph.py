"""Hot load phases in a fresh process: python hotph.py DIR [empty]
(empty: torch.cuda.empty_cache() between loads, as the bench does before its timed load)"""
import json, os, sys, time, subprocess
import torch
sys.path.insert(0, "src")
import flashtensors as ft
from flashtensors.engine import api, devices, pinned, readers
D = sys.argv[1]
torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
files = sorted(os.path.join(D, f) for f in os.listdir(D) if f.endswith(".safetensors"))
total = sum(os.path.getsize(f) for f in files)
ft.configure(mem_pool_size=total * 2); ft.pin(files)
ph = {}
def wrap(mod, name):
    orig = getattr(mod, name)
    def w(*a, **k):
        s = time.perf_counter()
        try: return orig(*a, **k)
        finally: ph[name] = round(ph.get(name, 0) + time.perf_counter() - s, 5)
    setattr(mod, name, w)
for mod, name in [(api, "make_plan"), (api, "resolve_files"), (devices, "allocate_arena"), (api, "_read"),
                  (api, "_views"), (api, "_relocate"), (readers, "side_stream"), (readers, "read_pinned"), (pinned, "lookup")]:
    wrap(mod, name)
out = []
for i in range(3):
    ph.clear()
    torch.cuda.synchronize(); s = time.perf_counter()
    r = api.load(D, device="cuda"); torch.cuda.synchronize(); el = time.perf_counter() - s
    out.append(dict(s=round(el, 4), GBs=round(total / el / 1e9, 2), ph=dict(ph), paths=sorted(set(r.stats.paths.values()))))
    del r
    if sys.argv[2:] == ["empty"]:
        torch.cuda.empty_cache()
print("HOTPH " + json.dumps([{k: o[k] for k in ("s", "GBs")} | {"dma": o["ph"].get("read_pinned")} for o in out]), flush=True)
