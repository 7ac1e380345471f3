"""Hot DMA into device memory that torch just returned to the driver, against reused memory, and the same
after the freed memory has had time to settle. python realloc.py DIR [ROUNDS]
Prints one line per (case, round): the DMA of every pinned file into a fresh arena, timed with events."""
import json, os, sys, time
sys.path.insert(0, "src")
import torch
import flashtensors as ft
from flashtensors.engine import pinned, readers
from flashtensors.engine.plan import make_plan, resolve_files

D = sys.argv[1]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
files = resolve_files(D)
total = sum(os.path.getsize(f) for f in files)
torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
ft.configure(mem_pool_size=total * 2)
ft.pin(files)
plan = make_plan(files)
entries = [pinned.acquire(f) for f in files]


def dma() -> float:
    arena = torch.empty(plan.arena_size, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    t = time.perf_counter()
    readers.read_pinned(list(plan.regions), arena, entries)
    el = time.perf_counter() - t
    del arena
    return total / el / 1e9


dma()  # first DMA of the process
out = {}
for case in ("reused", "empty", "empty+settle"):
    for r in range(rounds):
        dma()  # leaves a freed arena in torch's cache
        if case != "reused":
            torch.cuda.empty_cache()
        if case == "empty+settle":
            torch.cuda.synchronize()
            time.sleep(0.5)  # measured effect of waiting, not a synchronization
        out.setdefault(case, []).append(round(dma(), 2))
pinned.release(entries)
print("REALLOC " + json.dumps(out), flush=True)
