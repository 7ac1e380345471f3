"""What the copy path's first use in a fresh process costs, step by step, after a cache drop:
python primeph.py DIR [ROUNDS]

Each round is a fresh process: CUDA context made, then the page cache dropped (as before a cold load),
then the steps of ``streams.prime_copies`` timed one by one (ms), then the same steps again (their
second use). DIR is only used to name the files the drop is asked for."""
import json, os, subprocess, sys, time

D = sys.argv[1]
if sys.argv[2:3] != ["child"]:
    for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 3):
        out = subprocess.run([sys.executable, __file__, D, "child"], capture_output=True, text=True)
        print(out.stdout.strip() or out.stderr[-2000:], flush=True)
    raise SystemExit(0)

sys.path.insert(0, os.environ.get("PROBE_SRC", "src"))
import torch
torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
from flashtensors.bench.cache import drop_cache
from flashtensors.engine import devices, streams
from flashtensors.engine.plan import resolve_files
from flashtensors.engine.sysio import DIRECT_ALIGN

drop_cache([str(f) for f in resolve_files(D)], "drop_caches")
dev = torch.device("cuda", 0)
out = []
for use in (1, 2):
    t = {}
    last = time.perf_counter()

    def step(name):
        global last
        now = time.perf_counter(); t[name] = round((now - last) * 1e3, 2); last = now

    page = devices.PinnedBuffer(DIRECT_ALIGN, piece=DIRECT_ALIGN); step("PinnedBuffer")
    page.mapping.advise(23, 0, DIRECT_ALIGN); step("populate")
    devices.host_register(page.address, DIRECT_ALIGN); step("host_register")
    src = devices.host_view(page.address, DIRECT_ALIGN)[:64]; step("host_view")
    dst = torch.empty(64, dtype=torch.uint8, device=dev); step("empty on GPU")
    stream = devices.new_stream(dev); step("new_stream")
    with torch.cuda.stream(stream):
        step("stream ctx")
        dst.copy_(src, non_blocking=True); step("copy_")
        done = torch.cuda.Event(); step("Event")
        done.record(stream); step("record")
    done.synchronize(); step("synchronize")
    del src
    devices.host_unregister(page.address); step("host_unregister")
    out.append(dict(use=use, total=round(sum(t.values()), 1), **t))
print("PRIMEPH " + json.dumps(out), flush=True)
