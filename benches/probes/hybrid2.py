"""Warm load by pinning the files' head and memcpy-ing their tail through a pinned ring, at once, where
only the pinning thread calls CUDA: python hybrid2.py DIR [ROUNDS] [VARIANT ...]

The hybrid of engine v2 lost to both halves because ring threads' CUDA calls (stream creation, copies)
waited for the driver lock while another thread was inside cudaHostRegister. Here the ring threads only
pread into pinned slots; the pinning thread queues their copies between its registrations and hands
slots back once their events have completed.

Variants (NAME[-CAP_MIB][-THREADS]):
  pin-CAP          pin only, pieces of max(64 MiB, rest/4) capped at CAP MiB, DMA as each is pinned
  ring-T           ring only: T threads pread, one thread queues the copies
  hyb-CAP-T        both: pinning from the front, T ring threads from the back
One process; the files' pages stay in the page cache as they are; the ring (32 x 16 MiB, populated and
pinned) is made before the clock, as in a process that already loaded once. Variants run in rotation.
Prints per variant the median GB/s, the share the ring carried and the pinning rate."""
import bisect, os, queue, statistics, sys, threading, time
sys.path.insert(0, "src")
import torch
from flashtensors.engine import devices
from flashtensors.engine.sysio import MADV_POPULATE_WRITE, Mapping, align_up, buffer_at, pread_full

MiB = 1 << 20
D = sys.argv[1]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
variants = sys.argv[3:] or ["pin-1024", "ring-8", "hyb-1024-8", "hyb-256-8", "hyb-256-4", "hyb-128-8"]
files = sorted(os.path.join(D, f) for f in os.listdir(D) if f.endswith(".safetensors"))
sizes = [os.path.getsize(f) for f in files]
starts = [sum(sizes[:i]) for i in range(len(sizes))]
total = sum(sizes)
torch.cuda.init()
arena = torch.empty(total, dtype=torch.uint8, device="cuda")
SLOT, NSLOT = 16 * MiB, 32
ring = Mapping(None, SLOT * NSLOT, huge=True, populate=False)
ring.advise(MADV_POPULATE_WRITE)
slot_tensors = []
for i in range(NSLOT):
    devices.host_register(ring.address + i * SLOT, SLOT)
    slot_tensors.append(devices.host_view(ring.address + i * SLOT, SLOT))
pin_stream, ring_stream = torch.cuda.Stream(), torch.cuda.Stream()
fds = [os.open(f, os.O_RDONLY) for f in files]
torch.cuda.synchronize()


class Split:
    def __init__(self) -> None:
        self.lo, self.hi, self.lock = 0, total, threading.Lock()

    def front(self, want: int):
        with self.lock:
            if self.lo >= self.hi:
                return None
            i = bisect.bisect_right(starts, self.lo) - 1
            n = min(want, starts[i] + sizes[i] - self.lo, self.hi - self.lo)
            pos, self.lo = self.lo, self.lo + n
            return i, pos - starts[i], n, pos

    def back(self, want: int):
        with self.lock:
            if self.hi <= self.lo:
                return None
            i = bisect.bisect_right(starts, self.hi - 1) - 1
            floor = max(starts[i], self.lo)
            new = max(floor, starts[i] + align_up(max(0, self.hi - want - starts[i]), 4096))
            pos, n, self.hi = new, self.hi - new, new
            return i, pos - starts[i], n, pos


def run(variant: str):
    parts = variant.split("-")
    kind = parts[0]
    cap = int(parts[1]) * MiB if kind in ("pin", "hyb") else 0
    threads = int(parts[-1]) if kind in ("ring", "hyb") else 0
    split = Split()
    maps = [Mapping(f, s) for f, s in zip(files, sizes)]
    free: queue.SimpleQueue = queue.SimpleQueue()
    full: queue.SimpleQueue = queue.SimpleQueue()
    for i in range(NSLOT):
        free.put(i)
    ring_bytes = [0]

    def reader() -> None:
        try:
            while (c := split.back(SLOT)) is not None:
                i, off, n, pos = c
                s = free.get()
                got = pread_full(fds[i], buffer_at(ring.address + s * SLOT, n), off)
                assert got == n
                full.put((s, n, pos))
        finally:
            full.put(None)

    pinned, reg_s, pin_bytes = [], 0.0, 0
    inflight = []  # (event, slot)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    ts = [threading.Thread(target=reader) for _ in range(threads)]
    for t in ts:
        t.start()
    done_readers = 0

    def dispatch(item) -> None:
        nonlocal done_readers
        if item is None:
            done_readers += 1
            return
        s, n, pos = item
        with torch.cuda.stream(ring_stream):
            arena[pos:pos + n].copy_(slot_tensors[s][:n], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(ring_stream)
        inflight.append((ev, s))
        ring_bytes[0] += n

    def reap(block: bool) -> None:
        while inflight and (block or inflight[0][0].query()):
            ev, s = inflight.pop(0)
            ev.synchronize()
            free.put(s)
            block = False

    first = True
    while cap:
        while True:
            try:
                dispatch(full.get_nowait())
            except queue.Empty:
                break
        reap(False)
        want = 64 * MiB if first else min(cap, max(64 * MiB, (split.hi - split.lo) // 4))
        first = False
        c = split.front(align_up(want, 2 * MiB))
        if c is None:
            break
        i, off, n, pos = c
        a = time.perf_counter()
        devices.host_register(maps[i].address + off, align_up(n, 4096))
        reg_s += time.perf_counter() - a
        pin_bytes += n
        pinned.append(maps[i].address + off)
        with torch.cuda.stream(pin_stream):
            arena[pos:pos + n].copy_(devices.host_view(maps[i].address + off, n), non_blocking=True)
    while done_readers < threads:
        try:
            dispatch(full.get_nowait())
        except queue.Empty:
            if inflight:
                reap(True)
            else:
                dispatch(full.get())
    reap(True)
    for t in ts:
        t.join()
    pin_stream.synchronize()
    ring_stream.synchronize()
    dt = time.perf_counter() - t0
    for a in pinned:
        devices.host_unregister(a)
    for m in maps:
        m.close()
    assert pin_bytes + ring_bytes[0] == total, (pin_bytes, ring_bytes[0], total)
    return dt, ring_bytes[0] / total, (pin_bytes / reg_s / 1e9 if reg_s else 0.0)


# reference bytes: a plain read of the first and last MiB of every file, compared after each variant
def _ends(f: str) -> tuple[bytes, bytes]:
    with open(f, "rb") as fh:
        head = fh.read(MiB)
        fh.seek(-MiB, os.SEEK_END)
        return head, fh.read()


ref = [(i, *_ends(f)) for i, f in enumerate(files)]
res: dict[str, list] = {v: [] for v in variants}
for r in range(rounds):
    order = variants[r % len(variants):] + variants[:r % len(variants)]
    for v in order:
        arena.zero_()
        torch.cuda.synchronize()
        res[v].append(run(v))
        for i, head, tail in ref:
            a = arena[starts[i]:starts[i] + MiB].cpu().numpy().tobytes()
            b = arena[starts[i] + sizes[i] - MiB:starts[i] + sizes[i]].cpu().numpy().tobytes()
            assert a == head and b == tail, f"{v}: bytes differ in file {i}"
print(f"hybrid2 {D}: {total / 1e9:.2f} GB, {rounds} rounds, bytes checked")
print("| variant | median GB/s | runs GB/s | ring share | pin GB/s |")
print("|---|---|---|---|---|")
for v, rs in res.items():
    gb = [total / x[0] / 1e9 for x in rs]
    print(f"| {v} | {statistics.median(gb):.2f} | {' / '.join(f'{g:.1f}' for g in gb)} | "
          f"{statistics.median(x[1] for x in rs):.2f} | {statistics.median(x[2] for x in rs):.1f} |")
