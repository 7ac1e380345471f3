"""How many staging slots does one cold load use? (fifteenth session: reads that land in less memory are
faster on the lent machines' virtual disks.)
python slotsused.py DIR     (FLASH_CHUNK_SIZE, FLASH_READ_SIZE etc. from the environment)

Drops the files from the page cache, loads them once with read_path="direct" in this process, and
prints, for the ring the load read through, the slots it pinned (each slot is pinned on its first use,
so pinned = used), their MiB, and the load's GB/s."""
import os
import sys

sys.path.insert(0, os.environ.get("PROBE_SRC", "src"))
import torch

from flashtensors.bench.cache import drop_cache
from flashtensors.engine import staging
from flashtensors.engine.api import load

D = sys.argv[1]
files = sorted(os.path.join(D, f) for f in os.listdir(D) if f.endswith(".safetensors"))
drop_cache(files, "drop_caches")
r = load(D, device="cuda", read_path="direct")
torch.cuda.synchronize()
for _, ring in staging._rings.values():
    used = sum(s.pinned for s in ring.slots)
    print(f"SLOTS {ring.slot_size // 1024} KiB slots: used {used} of {len(ring.slots)} = "
          f"{used * ring.slot_size / 2**20:.0f} MiB; {r.stats.gbps:.2f} GB/s", flush=True)
