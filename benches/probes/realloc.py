"""Hot DMA into device memory that torch just returned to the driver, against reused memory, and the same
after the freed memory has had time to settle, and after a kernel wrote it first. python realloc.py DIR [ROUNDS]
Prints one JSON line: GB/s of the DMA of every pinned file into the arena, per case and round, and the
time to allocate (and zero) the arena. Run it again with PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync."""
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


alloc_ms: dict = {}


def dma(case: str = "", touch: bool = False) -> float:
    t = time.perf_counter()
    arena = torch.empty(plan.arena_size, dtype=torch.uint8, device="cuda")
    if touch:
        arena.zero_()
    torch.cuda.synchronize()
    alloc_ms.setdefault(case, []).append(round((time.perf_counter() - t) * 1e3, 2))
    t = time.perf_counter()
    readers.read_pinned(list(plan.regions), arena, entries)
    el = time.perf_counter() - t
    del arena
    return total / el / 1e9


dma()  # first DMA of the process
out = {}
for case in ("reused", "empty", "empty+settle", "empty+zero"):
    for r in range(rounds):
        dma()  # leaves a freed arena in torch's cache
        if case != "reused":
            torch.cuda.empty_cache()
        if case == "empty+settle":
            torch.cuda.synchronize()
            time.sleep(0.5)  # measured effect of waiting, not a synchronization
        out.setdefault(case, []).append(round(dma(case, touch=case == "empty+zero"), 2))
# Memory freed elsewhere: DMA into an arena kept all along, right after another block of the same size
# was freed to the driver. Slow here too means the driver's work after a free slows any DMA.
keep = torch.empty(plan.arena_size, dtype=torch.uint8, device="cuda")
for r in range(rounds):
    other = torch.empty(plan.arena_size, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    del other
    torch.cuda.empty_cache()
    t = time.perf_counter()
    readers.read_pinned(list(plan.regions), keep, entries)
    out.setdefault("kept, other freed", []).append(round(total / (time.perf_counter() - t) / 1e9, 2))
pinned.release(entries)
backend = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "native")
print("REALLOC " + json.dumps({"allocator": backend, "GBs": out, "alloc_ms": alloc_ms}), flush=True)
