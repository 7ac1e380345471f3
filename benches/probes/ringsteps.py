"""The staging ring's setup steps, timed with the major page faults each takes: python ringsteps.py [evict]
evict: first drop torch's own library pages from the page cache (posix_fadvise DONTNEED on torch/lib/*.so*),
which is what a cache drop before a cold load does to code the process has not run yet. Runs on CPU."""
import glob, os, resource, sys, time
sys.path.insert(0, "src")
import torch
from flashtensors.engine import devices
from flashtensors.engine.sysio import Mapping

if "evict" in sys.argv[1:]:
    for lib in glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "*.so*")):
        fd = os.open(lib, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # pages mapped by a running process stay
        os.close(fd)


def step(name, fn):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    t = time.perf_counter()
    out = fn()
    ms = (time.perf_counter() - t) * 1e3
    print(f"RINGSTEP {name} {ms:.2f} ms, {resource.getrusage(resource.RUSAGE_SELF).ru_majflt - before} major faults",
          flush=True)
    return out


SLOT, SLOTS = 16 << 20, 16
m = step("mmap", lambda: Mapping(None, SLOT * SLOTS, huge=True, populate=False))
v = step("frombuffer", lambda: devices.host_view(m.address, SLOT * SLOTS))
step("slices", lambda: [v[i * SLOT:(i + 1) * SLOT] for i in range(SLOTS)])
