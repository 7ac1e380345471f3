"""Does the read's destination change O_DIRECT speed? Raw reads of a checkpoint's files by N threads in
requests of S bytes, in file order from one shared list (as ``cache.timed_parallel_read``), into:
  fixed   each thread's own S bytes (4 KiB pages below 2 MiB), reused
  own     each thread's own 16 MiB of huge pages, each read at its start (the bench's raw limit,
          cache.timed_parallel_read)
  ring16M, ring64M, ...  a ring of that size, faulted in up front, as ring
  ring    a 512 MiB ring of huge pages faulted in up front; read k goes to piece k mod ring
  ringnp  the same ring not faulted in (the first reads fault it, as a fresh process's staging ring)
  ringpin the same ring faulted in and registered with cudaHostRegister (as our slots after first use)
  ring4k  the same ring in 4 KiB pages
  ringpre ringnp, faulted in whole inside the timed span before the reads start
  ringbg  ringnp, with a thread faulting the ring in, 16 MiB at a time, while the reads run
python rawdest.py DIR REPS [N] [S] [VARIANTS]   (S in K/M; VARIANTS comma-separated, default all)
"""
import os, statistics, sys, threading, time
sys.path.insert(0, "src")
from flashtensors.bench.cache import drop_cache
from flashtensors.engine.sysio import Mapping, buffer_at

D, reps = sys.argv[1], int(sys.argv[2])
N = int(sys.argv[3]) if len(sys.argv) > 3 else 16
S = sys.argv[4] if len(sys.argv) > 4 else "512K"
S = int(S[:-1]) * {"K": 1024, "M": 2**20}[S[-1]]
names = sys.argv[5].split(",") if len(sys.argv) > 5 else ["fixed", "ring", "ringnp", "ringpre", "ringbg", "ringpin", "ring4k"]
RING = 512 * 2**20
files = sorted(os.path.join(D, f) for f in os.listdir(D) if f.endswith(".safetensors"))
total = sum(os.path.getsize(f) for f in files)
work = [(f, o, min(S, os.path.getsize(f) - o)) for f in files for o in range(0, os.path.getsize(f), S)]


def run(name):
    fds = {f: os.open(f, os.O_RDONLY | os.O_DIRECT) for f in files}
    size = RING
    if name in ("fixed", "own"):
        bufs = [Mapping(None, S if name == "fixed" else 16 * 2**20, huge=True) for _ in range(N)]
        ring = None
    else:
        if name[4:5].isdigit():  # "ring16M"
            size = int(name[4:-1]) * {"K": 1024, "M": 2**20}[name[-1]]
        ring = Mapping(None, size, huge=name != "ring4k", populate=name not in ("ringnp", "ringbg", "ringpre"))
        if name == "ring4k":
            ring.advise(14, 0)  # MADV_NOHUGEPAGE
            ring.advise(23, 0)  # MADV_POPULATE_WRITE
        if name == "ringpin":
            from flashtensors.engine import devices
            import torch
            torch.cuda.init()
            devices.host_register(ring.address, size)
    it = iter(enumerate(work))
    lock = threading.Lock()
    def reader(t):
        while True:
            with lock:
                got = next(it, None)
            if got is None:
                return
            k, (f, o, n) = got
            addr = bufs[t].address if ring is None else ring.address + (k * S) % size
            want = (n + 4095) & ~4095
            os.preadv(fds[f], [buffer_at(addr, want)], o)
    pool = [threading.Thread(target=reader, args=(t,)) for t in range(N)]
    if name == "ringbg":
        def fault():
            for off in range(0, size, 16 * 2**20):
                ring.advise(23, off, 16 * 2**20)  # MADV_POPULATE_WRITE
        pool.insert(0, threading.Thread(target=fault))
    s = time.perf_counter()
    if name == "ringpre":
        ring.advise(23, 0)
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    el = time.perf_counter() - s
    for fd in fds.values():
        os.close(fd)
    return total / el / 1e9


res = {n: [] for n in names}
for rep in range(reps):
    order = names[rep % len(names):] + names[:rep % len(names)]
    for name in order:
        drop_cache(files, "drop_caches")
        res[name].append(round(run(name), 3))
        print(rep, name, res[name][-1], flush=True)
print(f"RAWDEST {N}x{S // 1024}K", {k: (statistics.median(v), v) for k, v in res.items()}, flush=True)
