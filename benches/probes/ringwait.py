"""Where a cold load through the staging ring waits, by ring size:
python ringwait.py DIR [ROUNDS] [RINGS]   (RINGS: comma-separated FLASH_RING_SIZE values, default 256M,512M)

Each round runs, in rotation, the bench's raw O_DIRECT read (8 threads) and one cold load per ring size,
each in a fresh process with the cache dropped first (as the bench's cold rounds are). A load reports:

* the readers: reads, mean and longest read (ms), the mean number of reads in flight over the load's
  read window (8 readers would keep 8), the time each reader spent blocked on a free slot (total over
  readers, longest single wait, waits over 1 ms), and the first read into each slot against the rest
  (a slot's first read faults its pages in);
* the loading thread: time blocked waiting for a full slot, for a copy to finish (a slot to recycle),
  and pinning slots (first use), each as [calls, total ms, longest ms];
* stalls: 50 ms windows of the read window in which fewer than half the mean bytes completed;
* the ring's huge pages: AnonHugePages of its mapping after the load (O_DIRECT requests into 4 KiB pages
  reach the disk in more pieces).
"""
import json, os, queue, subprocess, sys, threading, time

D = sys.argv[1]
if sys.argv[2:3] != ["child"]:
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    rings = (sys.argv[3] if len(sys.argv) > 3 else "256M,512M").split(",")
    for r in range(rounds):
        for kind in ["raw"] + rings:
            env = dict(os.environ)
            if kind != "raw":
                env["FLASH_RING_SIZE"] = kind
            out = subprocess.run([sys.executable, __file__, D, "child", kind], capture_output=True, text=True, env=env)
            print(out.stdout.strip() or out.stderr[-2000:], flush=True)
    raise SystemExit(0)

sys.path.insert(0, os.environ.get("PROBE_SRC", "src"))
import torch
torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
from flashtensors.bench.cache import chunks, drop_cache, timed_parallel_read
from flashtensors.engine import api, devices, ring_feeder
from flashtensors.engine.plan import resolve_files

files = [str(f) for f in resolve_files(D)]
total = sum(os.path.getsize(f) for f in files)
kind = sys.argv[3]
drop_cache(files, "drop_caches")
if kind == "raw":
    got, sec = timed_parallel_read(chunks(files), 8, direct=True)
    print("RINGWAIT " + json.dumps(dict(kind="raw", s=round(sec, 4), GBs=round(got / sec / 1e9, 3))), flush=True)
    raise SystemExit(0)

lock = threading.Lock()
reads = []  # (thread, slot, begin, end, bytes)
blocked = {}  # (who, what) -> [calls, total s, longest s]


def note(key, d):
    with lock:
        m = blocked.setdefault(key, [0, 0.0, 0.0])
        m[0] += 1; m[1] += d; m[2] = max(m[2], d)


free_waits = []  # reader waits for a free slot, seconds


class TimedQueue:
    """queue.SimpleQueue (or, as ``TimedLifo``, the free slots' LifoQueue) whose blocking get() is timed
    per calling thread."""

    base = queue.SimpleQueue

    def __init__(self):
        self.q = self.base()

    def put(self, item):
        self.q.put(item)

    def get_nowait(self):
        return self.q.get_nowait()

    def empty(self):
        return self.q.empty()

    def get(self):
        b = time.perf_counter()
        item = self.q.get()
        d = time.perf_counter() - b
        if threading.current_thread().name.startswith("flash-ring"):
            with lock:
                free_waits.append(d)
        else:
            note(("main", "full.get"), d)
        return item


class TimedLifo(TimedQueue):
    base = queue.LifoQueue


class Shim:
    SimpleQueue = TimedQueue
    LifoQueue = TimedLifo
    Empty = queue.Empty


ring_feeder.queue = Shim
real_read_chunk = ring_feeder.RingFeeder._read_chunk


def read_chunk(self, i, address, offset, n):
    b = time.perf_counter()
    try:
        return real_read_chunk(self, i, address, offset, n)
    finally:
        e = time.perf_counter()
        slot = (address - self.ring.buffer.address) // self.ring.slot_size
        with lock:
            reads.append((threading.get_ident(), slot, b, e, n))


ring_feeder.RingFeeder._read_chunk = read_chunk
real_recycle = ring_feeder.RingFeeder._recycle


def recycle(self, block):
    b = time.perf_counter()
    try:
        return real_recycle(self, block)
    finally:
        if block:
            note(("main", "recycle.block"), time.perf_counter() - b)


ring_feeder.RingFeeder._recycle = recycle
real_pin = devices.PinnedBuffer.pin


def pin(self, offset):
    b = time.perf_counter()
    already = (self.mapping.address + offset) in self._pinned
    try:
        return real_pin(self, offset)
    finally:
        if not already:
            note(("main", "slot.pin"), time.perf_counter() - b)


devices.PinnedBuffer.pin = pin


def huge_kb(address):
    """AnonHugePages (kB) and size (kB) of the mapping that holds ``address``."""
    with open("/proc/self/smaps") as f:
        inside, size = False, 0
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "Size:":
                size = int(line.split()[1])
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1]), size
    return None, None


torch.cuda.synchronize()
s = time.perf_counter()
r = api.load(D, device="cuda")
torch.cuda.synchronize()
el = time.perf_counter() - s
from flashtensors.config import get_settings
from flashtensors.engine.staging import _rings

ring = next(iter(_rings.values()))[1]
huge, size = huge_kb(ring.buffer.address)
rs = sorted(reads, key=lambda x: x[2])
first_b, last_e = rs[0][2], max(x[3] for x in rs)
window = last_e - first_b
dur = [x[3] - x[2] for x in rs]
seen, first_use, rest = set(), [], []
for t, slot, b, e, n in rs:
    (rest if slot in seen else first_use).append(e - b)
    seen.add(slot)
# 50 ms windows: bytes whose reads completed in each
width = 0.05
bins = [0] * (int(window / width) + 1)
for t, slot, b, e, n in rs:
    bins[int((e - first_b) / width)] += n
full_bins = bins[:-1] or bins
mean_bin = sum(full_bins) / len(full_bins)
stalls = [round(i * width, 2) for i, v in enumerate(full_bins) if v < mean_bin / 2]
ms = lambda xs: round(1e3 * sum(xs) / len(xs), 2) if xs else None
out = dict(
    kind=kind, s=round(el, 4), GBs=round(total / el / 1e9, 3), reads_GBs=round(total / window / 1e9, 3),
    slots=len(ring.slots), readers=len({x[0] for x in rs}), reads=len(rs),
    read_ms=ms(dur), read_ms_max=round(1e3 * max(dur), 1), in_flight=round(sum(dur) / window, 2),
    first_read_ms=ms(first_use), later_read_ms=ms(rest),
    free_wait_ms=round(1e3 * sum(free_waits), 1), free_wait_max_ms=round(1e3 * max(free_waits or [0]), 1),
    free_waits_over_1ms=sum(1 for w in free_waits if w > 1e-3),
    main={f"{k[1]}": [c, round(t * 1e3, 1), round(x * 1e3, 1)] for k, (c, t, x) in blocked.items()},
    stalls_50ms=stalls[:20], n_stalls=len(stalls), huge_kb=huge, ring_kb=size,
    io_threads=get_settings().io_threads,
)
print("RINGWAIT " + json.dumps(out), flush=True)
