"""Pinning a page cache and DMA at once, or one after the other: python pinsched.py DIR [ROUNDS]
One process; the files' pages stay as they are (kept cache). Variants, in rotation, each with the engine's
pin_schedule pieces:
  pipelined  DMA each piece as soon as it is pinned (the engine's warm path)
  pin-only   the same pins, no DMA
  defer50    no DMA until half the bytes are pinned, then as pipelined
  pin-then   pin everything, then DMA everything
Prints per variant the median total GB/s and the pinning rate (bytes / time inside cudaHostRegister)."""
import json, os, statistics, sys, time
sys.path.insert(0, "src")
import torch
from flashtensors.engine import devices
from flashtensors.engine.pinned_mmap import pin_schedule
from flashtensors.engine.sysio import Mapping, align_up

D = sys.argv[1]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
files = sorted(os.path.join(D, f) for f in os.listdir(D) if f.endswith(".safetensors"))
sizes = [os.path.getsize(f) for f in files]
total = sum(sizes)
torch.cuda.init()
arena = torch.empty(total, dtype=torch.uint8, device="cuda")
stream = torch.cuda.Stream()
torch.cuda.synchronize()


def run(variant: str) -> tuple[float, float]:
    maps = [Mapping(f, s) for f, s in zip(files, sizes)]
    pieces = [(m, off, n) for m, ps in zip(maps, pin_schedule(sizes, 1 << 30)) for off, n in
              zip([sum(ps[:i]) for i in range(len(ps))], ps)]
    pinned, reg, done, queued = [], 0.0, 0, 0
    dst = {}
    pos = 0
    for m, off, n in pieces:
        dst[(id(m), off)] = pos
        pos += n
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.cuda.stream(stream):
        for m, off, n in pieces:
            s = time.perf_counter()
            devices.host_register(m.address + off, align_up(n, 4096))
            reg += time.perf_counter() - s
            pinned.append(m.address + off)
            done += n
            go = {"pipelined": True, "pin-only": False, "defer50": done >= total / 2,
                  "pin-then": done == total}[variant]
            while go and queued < len(pinned):
                qm, qo, qn = pieces[queued]
                d = dst[(id(qm), qo)]
                arena[d:d + qn].copy_(devices.host_view(qm.address + qo, qn), non_blocking=True)
                queued += 1
    stream.synchronize()
    el = time.perf_counter() - t0
    for a in pinned:
        devices.host_unregister(a)
    for m in maps:
        m.close()
    return total / el / 1e9, total / reg / 1e9


variants = ["pipelined", "pin-only", "defer50", "pin-then"]
res = {v: [] for v in variants}
for r in range(rounds):
    for v in variants[r % 4:] + variants[: r % 4]:
        g, p = run(v)
        res[v].append((round(g, 2), round(p, 2)))
print("PINSCHED " + json.dumps({"dir": D, "GB": round(total / 1e9, 2), **{
    v: {"GBs": statistics.median(x[0] for x in xs), "pin_GBs": statistics.median(x[1] for x in xs), "all": xs}
    for v, xs in res.items()}}), flush=True)
