"""Cold loads in rotation, each a fresh process: ft variants (FLASH_* env) and peers.
python cold2.py DIR REPS [NAME,NAME...]  (default: every variant below)
e.g. the reader count (perf-notes Open 1):
python cold2.py /root/qwen3-0.6b 3 "ft direct 1t16M,ft direct 4t16M,ft direct 8t16M,ft direct 16t16M,fastsafetensors,raw O_DIRECT 1t,raw O_DIRECT 8t,raw O_DIRECT 16t"
Names not listed below are read as a grid: "ft NtS" loads with FLASH_IO_THREADS=N FLASH_CHUNK_SIZE=S
(the ring auto; "ft NtSrR" also FLASH_READ_SIZE=R; a suffix "sZ" FLASH_RING_SIZE=Z), "raw NtS" reads with N threads in requests of S bytes (K or M), O_DIRECT.
"""
import json, os, subprocess, sys, time, statistics
sys.path.insert(0, "src")
from flashtensors.bench.cache import drop_cache, chunks, parallel_read
D = sys.argv[1]; reps = int(sys.argv[2])
files = sorted(os.path.join(D, f) for f in os.listdir(D) if f.endswith(".safetensors"))
total = sum(os.path.getsize(f) for f in files)
M = 2**20
configs = {
    "ft direct 8t16M": ("ft", dict(FLASH_READ_PATH="direct")),
    "ft branch direct 8t16M": ("ft", dict(FLASH_READ_PATH="direct", PROBE_SRC=".probe/branch/src")),
    "ft buffered 16t16M": ("ft", dict(FLASH_READ_PATH="buffered")),
    "ft buffered 16t64M": ("ft", dict(FLASH_READ_PATH="buffered", FLASH_CHUNK_SIZE="64M", FLASH_RING_SIZE="1G")),
    "ft direct 16t64M": ("ft", dict(FLASH_READ_PATH="direct", FLASH_IO_THREADS="16", FLASH_CHUNK_SIZE="64M", FLASH_RING_SIZE="1G")),
    "ft direct 16t16M": ("ft", dict(FLASH_READ_PATH="direct", FLASH_IO_THREADS="16", FLASH_RING_SIZE="512M")),
    "ft direct 32t8M": ("ft", dict(FLASH_READ_PATH="direct", FLASH_IO_THREADS="32", FLASH_CHUNK_SIZE="8M", FLASH_RING_SIZE="512M")),
    "ft direct 1t16M": ("ft", dict(FLASH_READ_PATH="direct", FLASH_IO_THREADS="1")),
    "ft direct 2t16M": ("ft", dict(FLASH_READ_PATH="direct", FLASH_IO_THREADS="2")),
    "ft direct 4t16M": ("ft", dict(FLASH_READ_PATH="direct", FLASH_IO_THREADS="4")),
    "fastsafetensors": ("fastsafetensors", {}),
    "runai": ("runai", {}),
    "raw O_DIRECT 1t": ("raw1", {}),
    "raw O_DIRECT 4t": ("raw4", {}),
    "raw O_DIRECT 8t": ("raw8", {}),
    "raw O_DIRECT 16t": ("raw16", {}),
}
def size(text):
    return int(text[:-1]) * {"K": 1024, "M": M}[text[-1]]


def grid(name):
    """ "ft 16t2M" or "raw 16t512K" as a config."""
    kind, spec = name.split()
    spec, *flags = spec.split("+")  # "ft 16t16M+gil+hog": PROBE_GIL=1 PROBE_HOG=1 (in the child)
    extra = {f"PROBE_{f.upper()}": "1" for f in flags}
    spec, _, switch = spec.partition("%")  # "ft 16t16M%0.5": sys.setswitchinterval(0.5 ms) in the child
    extra = {**extra, **({"PROBE_SWITCH": str(float(switch) / 1000)} if switch else {})}
    spec, _, pre = spec.partition("!")  # "ft 16t16Mr512K!pre": one untimed load first, then a cache drop
    spec, _, tree = spec.partition("@")  # "ft 16t16Mr512K@fault_pre": the tree at .probe/fault_pre/src
    spec, _, ring = spec.partition("s")  # "ft 16t4Mr512Ks256M": FLASH_RING_SIZE=256M
    n, s = spec.split("t")
    s, _, r = s.partition("r")  # "16t16Mr512K": 16 MiB chunks read in 512 KiB requests
    if kind == "ft":
        env = dict(FLASH_READ_PATH="direct", FLASH_IO_THREADS=n, FLASH_CHUNK_SIZE=s)
        env = {**env, **({"FLASH_READ_SIZE": r} if r else {})}
        env = {**env, **({"PROBE_PRELOAD": "1"} if pre else {})}
        env = {**env, **({"FLASH_RING_SIZE": ring} if ring else {})}
        return ("ft", {**env, **extra, **({"PROBE_SRC": f".probe/{tree}/src"} if tree else {})})
    if kind == "rawin":  # the raw read in the loaders' child (CUDA up), where PROBE_* apply too
        return ("rawin", {**extra, "PROBE_RAW": f"{n}:{size(s)}"})
    if kind == "rawc":  # the raw read in a fresh child process, as the loaders run
        return (f"rawc{n}:{size(s)}", {})
    return (f"raw{n}:{size(s)}", {})


if len(sys.argv) > 3:
    configs = {k: configs[k] if k in configs else grid(k) for k in sys.argv[3].split(",")}
CHILD = r'''
import os, sys, time, torch
sys.path.insert(0, os.environ.get("PROBE_SRC", "src"))  # PROBE_SRC: another tree's src, e.g. a branch
from flashtensors.bench import loaders
name, D = sys.argv[1], sys.argv[2]
torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
import glob, pathlib, threading
if os.environ.get("PROBE_SWITCH"):
    sys.setswitchinterval(float(os.environ["PROBE_SWITCH"]))
gil, done = [], threading.Event()
def gil_probe():  # how late a thread that sleeps 1 ms gets the GIL back, while the load runs
    while not done.is_set():
        b = time.perf_counter(); time.sleep(0.001); gil.append(time.perf_counter() - b - 0.001)
def hog():  # pure-Python work that holds the GIL except at the switch interval
    x = 0
    while not done.is_set():
        x += 1
side = [threading.Thread(target=f, daemon=True) for f, on in ((gil_probe, "PROBE_GIL"), (hog, "PROBE_HOG")) if os.environ.get(on)]
def raw_read(t, device):
    from flashtensors.bench.cache import parallel_read
    n, r = map(int, os.environ["PROBE_RAW"].split(":"))
    work = [(str(f), o, min(r, os.path.getsize(f) - o)) for f in t.files for o in range(0, os.path.getsize(f), r)]
    parallel_read(work, n, direct=True)
    return {}
t = loaders.Target(pathlib.Path(D), tuple(pathlib.Path(f) for f in sorted(glob.glob(D + "/*.safetensors"))))
fn = {"rawin": raw_read, "ft": loaders._flashtensors, "fastsafetensors": loaders._fastsafetensors, "runai": loaders._runai}[name]
if os.environ.get("PROBE_PRELOAD"):  # as a daemon's later load: ring and streams made, then the cache dropped
    sd = fn(t, "cuda"); torch.cuda.synchronize(); del sd; torch.cuda.empty_cache()
    from flashtensors.bench.cache import drop_cache
    drop_cache(list(t.files), "drop_caches")
from flashtensors.engine import readers
win = []
orig = readers.pread_full
def timed(*a):
    b = time.perf_counter(); n = orig(*a); win.append((b, time.perf_counter())); return n
readers.pread_full = timed
for th in side:
    th.start()
s = time.perf_counter(); sd = fn(t, "cuda"); torch.cuda.synchronize(); e = time.perf_counter()
done.set()
if gil:
    gil.sort()
    print("G", len(gil), sum(gil) / len(gil), gil[len(gil) // 2], gil[len(gil) * 9 // 10], gil[-1])
if win:
    print("R", min(w[0] for w in win) - s, e - max(w[1] for w in win), len(win))
print("T", e - s)
'''
res = {k: [] for k in configs}
names = list(configs)
for rep in range(reps):
    order = names[rep % len(names):] + names[:rep % len(names)]
    for name in order:
        kind, env = configs[name]
        drop_cache(files, "drop_caches")
        if kind.startswith("rawc"):
            n, _, req = kind[4:].partition(":")
            code = ("import sys, os, time; sys.path.insert(0, 'src'); from flashtensors.bench.cache import parallel_read; "
                    f"F = {files!r}; r = {int(req)}; "
                    "w = [(f, o, min(r, os.path.getsize(f) - o)) for f in F for o in range(0, os.path.getsize(f), r)]; "
                    f"s = time.perf_counter(); parallel_read(w, {int(n)}, direct=True); print('T', time.perf_counter() - s)")
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            el = float([l for l in p.stdout.splitlines() if l.startswith("T ")][-1][2:])
        elif kind.startswith("raw") and kind != "rawin":
            n, _, req = kind[3:].partition(":")
            work = chunks(files)
            if req:  # requests of req bytes
                r = int(req)
                work = [(f, o, min(r, os.path.getsize(f) - o)) for f in files for o in range(0, os.path.getsize(f), r)]
            s = time.perf_counter(); parallel_read(work, int(n), direct=True); el = time.perf_counter() - s
        else:
            p = subprocess.run([sys.executable, "-c", CHILD, kind, D], env={**os.environ, **env}, capture_output=True, text=True)
            lines = [l for l in p.stdout.splitlines() if l.startswith("T ")]
            if not lines:
                print(name, "FAILED", p.stderr[-800:], flush=True); continue
            el = float(lines[-1][2:])
            rl = [l.split() for l in p.stdout.splitlines() if l.startswith("R ")]
            if rl:  # our reads' window: time before the first read began, after the last one ended
                before, after, n = float(rl[-1][1]), float(rl[-1][2]), int(rl[-1][3])
            gl = [l.split() for l in p.stdout.splitlines() if l.startswith("G ")]
            if gl:  # the GIL probe: ms late, mean / median / p90 / max
                g = [float(x) * 1e3 for x in gl[-1][2:]]
                print(f"   {name}: GIL probe {gl[-1][1]} wakes, late {g[0]:.2f} / {g[1]:.2f} / {g[2]:.2f} / {g[3]:.1f} ms (mean / median / p90 / max)", flush=True)
            if rl:
                print(f"   {name}: {n} reads; {before * 1e3:.0f} ms before the first, {after * 1e3:.0f} ms after the last; "
                      f"read window {total / (el - before - after) / 1e9:.3f} GB/s", flush=True)
        res[name].append(round(total / el / 1e9, 3))
        print(rep, name, res[name][-1], flush=True)
print("COLD " + json.dumps({k: (statistics.median(v) if v else None, v) for k, v in res.items()}), flush=True)
