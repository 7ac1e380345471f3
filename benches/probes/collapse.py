"""Does MADV_COLLAPSE (file THP, kernel 6.1+ with READ_ONLY_THP_FOR_FS) make a page cache pin faster?
python collapse.py FILE [ROUNDS]

Per round, on the same file: map it read-only, pin it whole (cudaHostRegister) and time that; unpin.
Then once: MADV_COLLAPSE over the mapping (timed; errno reported if refused, e.g. EINVAL without
file THP), then the same pin rounds again. The page cache is used as it is (fill it before)."""
import ctypes, os, statistics, sys, time
sys.path.insert(0, "src")
import torch
from flashtensors.engine import devices
from flashtensors.engine.sysio import Mapping

MADV_COLLAPSE = 25
path = sys.argv[1]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
size = os.path.getsize(path)
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
torch.cuda.init()


def pins() -> list[float]:
    out = []
    for _ in range(rounds):
        m = Mapping(path, size)
        t = time.perf_counter()
        devices.host_register(m.address, m.length)
        out.append(size / (time.perf_counter() - t) / 1e9)
        devices.host_unregister(m.address)
        m.close()
    return out


before = pins()
m = Mapping(path, size)
t = time.perf_counter()
rc = libc.madvise(m.address, m.length, MADV_COLLAPSE)
err = ctypes.get_errno()
took = time.perf_counter() - t
fp = None
with open("/proc/self/smaps") as fh:  # FilePmdMapped of our mapping: bytes mapped by 2 MiB entries
    lines = fh.read().splitlines()
for i, line in enumerate(lines):
    if line.startswith(f"{m.address:x}-"):
        for extra in lines[i + 1:i + 30]:
            if extra.startswith("FilePmdMapped:"):
                fp = extra.split()[1] + " kB"
                break
        break
m.close()
after = pins()
print(f"collapse {path}: {size / 1e9:.2f} GB; MADV_COLLAPSE rc={rc} errno={err} ({os.strerror(err) if rc else 'ok'}) "
      f"in {took * 1e3:.0f} ms; FilePmdMapped {fp}")
print(f"  pin GB/s before: {' / '.join(f'{x:.1f}' for x in before)} (median {statistics.median(before):.1f})")
print(f"  pin GB/s after:  {' / '.join(f'{x:.1f}' for x in after)} (median {statistics.median(after):.1f})")
