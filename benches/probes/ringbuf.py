"""O_DIRECT reads of the same files into different pinned buffers, cache dropped, in rotation:
4 KiB anonymous pages, 2 MiB pages (our ring), cudaHostAlloc (torch pin_memory).
python ringbuf.py DIR [ROUNDS] [THREADS]"""
import json, os, statistics, sys, threading, time
sys.path.insert(0, "src")
import torch
from flashtensors.bench.cache import chunks, drop_cache
from flashtensors.engine.sysio import Mapping, buffer_at

D = sys.argv[1]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 8
files = sorted(os.path.join(D, f) for f in os.listdir(D) if f.endswith(".safetensors"))
CH = 16 << 20
queues = {}
for dev in sorted(os.listdir("/sys/block")):
    base = f"/sys/block/{dev}/queue"
    if os.path.exists(f"{base}/max_segments") and not dev.startswith(("loop", "ram")):
        queues[dev] = {k: open(f"{base}/{k}").read().strip() for k in ("max_segments", "max_sectors_kb")}


def buffers(kind):
    if kind == "4k":
        ms = [Mapping(None, CH) for _ in range(threads)]
        return [m.address for m in ms], ms
    if kind == "2m":
        ms = [Mapping(None, CH, huge=True) for _ in range(threads)]
        return [m.address for m in ms], ms
    ts = [torch.empty(CH, dtype=torch.uint8, pin_memory=True) for _ in range(threads)]
    return [t.data_ptr() for t in ts], ts


def read(kind):
    addrs, keep = buffers(kind)
    work = iter(chunks(files))
    lock = threading.Lock()
    fds = {f: os.open(f, os.O_RDONLY | os.O_DIRECT) for f in files}
    drop_cache(files, "drop_caches")

    def run(addr):
        view = buffer_at(addr, CH)
        while True:
            with lock:
                item = next(work, None)
            if item is None:
                return
            path, off, n = item
            os.preadv(fds[path], [view[: (n + 4095) & ~4095]], off)

    ts = [threading.Thread(target=run, args=(a,)) for a in addrs]
    t = time.perf_counter()
    [x.start() for x in ts]; [x.join() for x in ts]
    el = time.perf_counter() - t
    for fd in fds.values():
        os.close(fd)
    return sum(os.path.getsize(f) for f in files) / el / 1e9


kinds = ["4k", "2m"] + (["cudaHostAlloc"] if torch.cuda.is_available() else [])
res = {k: [] for k in kinds}
for r in range(rounds):
    for k in kinds[r % len(kinds):] + kinds[: r % len(kinds)]:
        res[k].append(round(read(k), 2))
        print(r, k, res[k][-1], flush=True)
print("RINGBUF " + json.dumps({"queues": queues, **{k: (statistics.median(v), v) for k, v in res.items()}}), flush=True)
