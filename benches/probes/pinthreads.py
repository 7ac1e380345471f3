"""Does pinning a page cache scale with threads? python pinthreads.py DIR [ROUNDS]
Registers every file in 64 MiB pieces, shared among 1, 2, 4 or 8 threads (no DMA), in rotation, one
process. Prints the aggregate pinning rate per thread count."""
import json, os, statistics, sys, threading, time
sys.path.insert(0, "src")
import torch
from flashtensors.engine import devices
from flashtensors.engine.sysio import Mapping, align_up

D = sys.argv[1]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
files = sorted(os.path.join(D, f) for f in os.listdir(D) if f.endswith(".safetensors"))
total = sum(os.path.getsize(f) for f in files)
torch.cuda.init()
PIECE = 64 << 20


def run(threads: int) -> float:
    sizes = [os.path.getsize(f) for f in files]
    maps = [Mapping(f, s) for f, s in zip(files, sizes)]
    work = [(m, off, min(PIECE, s - off)) for m, s in zip(maps, sizes) for off in range(0, s, PIECE)]
    lock = threading.Lock()
    pinned: list[int] = []

    def pin() -> None:
        while True:
            with lock:
                if not work:
                    return
                m, off, n = work.pop(0)
            devices.host_register(m.address + off, align_up(n, 4096))
            with lock:
                pinned.append(m.address + off)

    ts = [threading.Thread(target=pin) for _ in range(threads)]
    t = time.perf_counter()
    [x.start() for x in ts]
    [x.join() for x in ts]
    el = time.perf_counter() - t
    for a in pinned:
        devices.host_unregister(a)
    for m in maps:
        m.close()
    return total / el / 1e9


counts = [1, 2, 4, 8]
res: dict[int, list[float]] = {c: [] for c in counts}
for r in range(rounds):
    for c in counts[r % 4:] + counts[: r % 4]:
        res[c].append(round(run(c), 2))
print("PINTHREADS " + json.dumps({"dir": D, **{str(c): (statistics.median(v), v) for c, v in res.items()}}), flush=True)
