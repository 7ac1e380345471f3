"""The tensor views' first use in a process, with its major page faults: python viewfaults.py DIR [ROUNDS]
Each round runs four fresh processes that import torch and the engine, then drop torch's own library pages
from the page cache (posix_fadvise DONTNEED on torch/lib/*.so*, what a cache drop before a cold load does to
code no process has mapped), then build every tensor view of DIR's checkpoint over a CPU arena:
  none   the views' first use after the drop, with the engine of BASE_SRC: a tree from before the
         import-time warm-up (``git archive 495dafa src | tar -x -C /tmp/base``; BASE_SRC=/tmp/base/src);
  import the engine's import-time warm-up (``api.warm_views``) ran before the drop;
  coldimp BASE_SRC's engine, then a drop, then the same ops as ``api.warm_views`` (timed: what the
         warm-up costs a process whose torch pages are not cached), then the drop and the views;
  twice  the views built once before the drop (the floor: every page they use is mapped).
Runs on CPU; the GPU's views go through the same torch paths but for the device's own kernels."""
import glob, os, resource, subprocess, sys, time

D = sys.argv[1]
if sys.argv[2:3] != ["child"]:
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    for r in range(rounds):
        for mode in ("none", "import", "coldimp", "twice"):
            out = subprocess.run([sys.executable, __file__, D, "child", mode], capture_output=True, text=True)
            print(out.stdout.strip() or out.stderr[-2000:], flush=True)
    raise SystemExit(0)

mode = sys.argv[3]
sys.path.insert(0, os.environ["BASE_SRC"] if mode in ("none", "coldimp") else os.environ.get("PROBE_SRC", "src"))
import torch
from flashtensors.engine import api
from flashtensors.engine.plan import make_plan, resolve_files



def evict():
    for lib in glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "*.so*")):
        fd = os.open(lib, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # pages mapped by a running process stay
        os.close(fd)


plan = make_plan(resolve_files(D), 0)
arena = torch.empty(plan.arena_size, dtype=torch.uint8)
warm = 0.0
if mode == "coldimp":
    evict()
if mode == "coldimp":  # the body of api.warm_views, on an engine that did not run it at import
    t = time.perf_counter()
    scratch = torch.empty(64, dtype=torch.uint8)
    for dtype in dict.fromkeys(api._TORCH_DTYPES.values()):
        scratch[8 : 8 + 2 * dtype.itemsize].view(dtype).view((2, 1))
    warm = (time.perf_counter() - t) * 1e3
elif mode == "twice":
    api._views(plan, arena)
evict()
before = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
t = time.perf_counter()
views = api._views(plan, arena)
ms = (time.perf_counter() - t) * 1e3
faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - before
print(f"VIEWS {mode:7s} {len(views)} views in {ms:6.2f} ms, {faults:3d} major faults (warm-up {warm:.2f} ms)")
