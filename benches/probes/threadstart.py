"""Why starting reader threads is slow while others read (runs on CPU; no GPU needed).

    PYTHONPATH=src python benches/probes/threadstart.py FILE            # FILE: ~1 GB, any bytes

1. One thread start (``Thread.start`` until it returns) while a background thread is idle, in ``pread``
   into populated memory, in ``pread`` into fresh memory, or looping in Python (holding the GIL).
2. ``RingFeeder.__init__`` (8 readers over FILE, 256 MiB ring of 16 MiB slots) with readers that read,
   with the ring faulted in first, and with nothing to read; each start timed.
Each case runs in a fresh process.
"""

import os
import subprocess
import sys
import threading
import time

CH = 16 << 20


def start_under(mode: str, path: str) -> str:
    from flashtensors.engine.sysio import Mapping, buffer_at, pread_full

    fd = os.open(path, os.O_RDONLY)
    stop = False
    kept = Mapping(None, CH, populate=True)

    def reader(fresh: bool) -> None:
        off = 0
        while not stop:
            m = Mapping(None, CH, populate=False) if fresh else kept
            pread_full(fd, buffer_at(m.address, CH), off % (1 << 30))
            off += CH
            if fresh:
                m.close()

    def busy() -> None:
        while not stop:
            pass

    target = {"pread-populated": lambda: reader(False), "pread-fresh": lambda: reader(True),
              "python-busy": busy, "idle": lambda: None}[mode]  # fmt: skip
    bg = threading.Thread(target=target)
    bg.start()
    took = []
    for _ in range(8):
        t0 = time.perf_counter()
        t = threading.Thread(target=lambda: None)
        t.start()
        took.append(1e3 * (time.perf_counter() - t0))
        t.join()
    stop = True
    bg.join()
    return f"thread start beside {mode:16s}: " + " ".join(f"{x:.2f}" for x in took) + " ms"


def feeder(mode: str, path: str) -> str:
    import torch

    from flashtensors.engine import sysio
    from flashtensors.engine.staging import StagingRing
    from flashtensors.engine.ring_feeder import RingFeeder

    ring = StagingRing.allocate(256 << 20, CH)
    if mode == "prefault":
        ring.buffer.mapping.advise(sysio.MADV_POPULATE_WRITE, 0, 256 << 20)
    size = os.path.getsize(path)

    class Region:
        file_start, file_end, arena_offset = 0, size, 0

    Region.path = path
    pos = [size]
    lock = threading.Lock()

    def claim(n: int):
        if mode == "noread":
            return None
        with lock:
            if pos[0] <= 0:
                return None
            start = max(0, pos[0] - n)
            pos[0] = start
            return 0, start, min(n, size - start)

    starts = []
    real = threading.Thread.start

    def timed(self: threading.Thread) -> None:
        t = time.perf_counter()
        real(self)
        starts.append(1e3 * (time.perf_counter() - t))

    threading.Thread.start = timed
    t0 = time.perf_counter()
    f = RingFeeder(ring, claim, [Region()], torch.empty(0, dtype=torch.uint8), 8)
    t1 = time.perf_counter()
    threading.Thread.start = real
    f.abort()  # no copy was queued (that needs a GPU): the readers stop after their current read
    return f"RingFeeder.__init__ ({mode:8s}) {1e3 * (t1 - t0):6.2f} ms; starts " + " ".join(f"{s:.1f}" for s in starts)


if __name__ == "__main__":
    path = sys.argv[1]
    if len(sys.argv) > 3:
        with open(path, "rb") as f:  # in the page cache, as a warm load finds it
            while f.read(64 << 20):
                pass
        print({"start": start_under, "feeder": feeder}[sys.argv[2]](sys.argv[3], path), flush=True)
        raise SystemExit(0)
    for mode in ("idle", "pread-populated", "pread-fresh", "python-busy"):
        subprocess.run([sys.executable, __file__, path, "start", mode, "child"], check=True)
    for _ in range(2):
        for mode in ("read", "prefault", "noread"):
            subprocess.run([sys.executable, __file__, path, "feeder", mode, "child"], check=True)
