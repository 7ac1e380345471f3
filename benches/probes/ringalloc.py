"""Staging-ring allocation in a fresh process: python ringalloc.py huge|plain"""
import json, sys, time
import torch
sys.path.insert(0, "src")
from flashtensors.engine import devices, sysio
torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
huge = sys.argv[1] == "huge"
s = time.perf_counter(); m = sysio.Mapping(None, 256 << 20, huge=huge); t_map = time.perf_counter() - s
s = time.perf_counter(); devices.host_register(m.address, m.length); t_reg = time.perf_counter() - s
a = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
s = time.perf_counter(); a.copy_(devices.host_view(m.address, 256 << 20), non_blocking=True); torch.cuda.synchronize(); t_cp = time.perf_counter() - s
ah = [l for l in open("/proc/meminfo") if l.startswith("AnonHugePages")][0].split()[1]
print("RING " + json.dumps(dict(huge=huge, map_ms=round(t_map * 1e3, 1), register_ms=round(t_reg * 1e3, 1),
      first_copy_ms=round(t_cp * 1e3, 1), anon_huge_kb=int(ah),
      thp=open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip())), flush=True)
