"""Probe trees for the cold-gap probes (perf-notes Open 1 and 2), rebuilt from src each time into .probe/NAME/src (run from the repo root).
Each is src with one change; cold2.py names them "ft ...@TREE". None is for use: copyfree races.
  nocopy    a full slot is freed at once, no copy
  copyfree  the copy is queued, and the slot freed at once without waiting for it (bytes may race)
  copycdll  cudaMemcpyAsync through a CDLL handle (the GIL let go for the call) instead of PyDLL
  fifo      free slots reused in ring order, first freed first (main before 14th session: LIFO)
  lean      the shared-slot readers call os.preadv directly: no ReadWindow, no pread_full loop
  ownspot   whole-chunk readers (chunk_size at most the direct slot, e.g. FLASH_CHUNK_SIZE=512K) each keep
            one slot of their own and wait for its copy before the next read, so the reads land in as
            many places as there are readers, as the raw read's do (sixteenth session, perf-notes Open 1)
  selfcopy  whole-chunk readers queue their own slot's copy and free finished slots themselves (no hand-off
            to the loading thread, which only waits for the end): how many spare slots a ring then needs
            (seventeenth session, perf-notes Open 3; run with FLASH_CHUNK_SIZE=512K FLASH_RING_SIZE=...)
"""
import pathlib, shutil

ROOT = pathlib.Path(".probe")
FEEDER = "src/flashtensors/engine/ring_feeder.py"
DEVICES = "src/flashtensors/engine/devices.py"
COPY_DOC = '''        on its first use, record an event behind the copy, and hold the slot until the event completes."""
'''
OWN_OLD = '            slot = self._free.get()\n            if self._stop:\n                self._free.put(slot)\n                break\n            got = self._read_chunk(i, self.ring.buffer.address + slot.offset, offset, n)\n            if got < n:\n                raise shrank(self.regions[i].path)\n            self._full.put((slot, i, offset, n))\n'
OWN_NEW = '            got = self._read_chunk(i, self.ring.buffer.address + slot.offset, offset, n)\n            if got < n:\n                raise shrank(self.regions[i].path)\n            self._full.put((slot, i, offset, n))\n            slot = home.get()  # probe: the same place again, once its copy is done\n        slot.home = None\n        self._free.put(slot)\n'
SELF_OLD = """            slot = self._free.get()
            if self._stop:
                self._free.put(slot)
                break
            got = self._read_chunk(i, self.ring.buffer.address + slot.offset, offset, n)
            if got < n:
                raise shrank(self.regions[i].path)
            self._full.put((slot, i, offset, n))
"""
SELF_NEW = """            slot = self._take_free()
            if self._stop:
                self._free.put(slot)
                break
            got = self._read_chunk(i, self.ring.buffer.address + slot.offset, offset, n)
            if got < n:
                raise shrank(self.regions[i].path)
            with self._copy_lock:  # probe: the reader queues its own copy, no hand-off
                self._copy(slot, i, offset, n)
                self._reap()

    def _reap(self) -> None:
        while self._inflight and self._inflight[0].event.query():
            self._free.put(self._inflight.popleft())

    def _take_free(self) -> Slot:
        while True:
            try:
                return self._free.get_nowait()
            except queue.Empty:
                pass
            with self._copy_lock:
                self._reap()
                oldest = self._inflight[0] if self._inflight else None
            if oldest is None:
                return self._free.get()  # every other slot is being read: one comes back
            oldest.event.synchronize()
"""
RECYCLE_OLD = """    def _recycle(self, block: bool) -> None:
        while self._inflight:
            slot = self._inflight[0]
            assert slot.event is not None
            if not block and not slot.event.query():
                break
            slot.event.synchronize()
            self._inflight.popleft()
            self._free.put(slot)
            block = False
"""
RECYCLE_NEW = """    def _recycle(self, block: bool) -> None:
        while True:
            with self._copy_lock:
                if not self._inflight:
                    return
                slot = self._inflight[0]
            if not block and not slot.event.query():
                return
            slot.event.synchronize()
            with self._copy_lock:
                if self._inflight and self._inflight[0] is slot:
                    self._free.put(self._inflight.popleft())
            block = False
"""
FINISH_OLD = """            while self.running:
                self.pump(wait=True)
"""
FINISH_NEW = """            while self.running:
                self._take(self._full.get())  # probe: the readers copy; only their ends come here
"""
PATCHES = {
    "nocopy": [(FEEDER, COPY_DOC, COPY_DOC + "        self._free.put(slot)\n        self.bytes[i] += n\n        return\n")],
    "copyfree": [(FEEDER, "        self._inflight.append(slot)\n        self.bytes[i] += n\n",
                  "        self._free.put(slot)  # probe: no wait for the copy\n        self.bytes[i] += n\n")],
    "copycdll": [(DEVICES, "copy = ctypes.PyDLL(name).cudaMemcpyAsync", "copy = lib.cudaMemcpyAsync")],
    "fifo": [(FEEDER, "        self._free: queue.LifoQueue[Slot] = queue.LifoQueue()\n",
              "        self._free: queue.SimpleQueue[Slot] = queue.SimpleQueue()\n")],
    "ownspot": [
        (FEEDER, """        while not self._stop:
            chunk = self.claim(self.ring.slot_size)
            if chunk is None:
                break
            i, offset, n = chunk
""", """        home = queue.SimpleQueue()
        slot = self._free.get()
        slot.home = home
        while not self._stop:
            chunk = self.claim(self.ring.slot_size)
            if chunk is None:
                break
            i, offset, n = chunk
"""),
        (FEEDER, OWN_OLD, OWN_NEW),
        (FEEDER, "            self._inflight.popleft()\n            self._free.put(slot)\n",
         "            self._inflight.popleft()\n            (getattr(slot, 'home', None) or self._free).put(slot)\n"),
        (FEEDER, "        if self._stop:\n            self._free.put(slot)\n            return\n",
         "        if self._stop:\n            (getattr(slot, 'home', None) or self._free).put(slot)\n            return\n"),
        (FEEDER, "            elif not isinstance(item, BaseException):\n                self._free.put(item[0])\n",
         "            elif not isinstance(item, BaseException):\n                (getattr(item[0], 'home', None) or self._free).put(item[0])\n"),
    ],
    "selfcopy": [
        (FEEDER, "        self._fallback_lock = threading.Lock()\n",
         "        self._fallback_lock = threading.Lock()\n        self._copy_lock = threading.Lock()\n"),
        (FEEDER, SELF_OLD, SELF_NEW),
        (FEEDER, RECYCLE_OLD, RECYCLE_NEW),
        (FEEDER, FINISH_OLD, FINISH_NEW),
    ],
    "lean": [(FEEDER, "            read = self._read_chunk(\n                filling.region, base + filling.slot.offset + start, filling.offset + start, m\n            )\n",
              "            read = os.preadv(self._fds[filling.region], [buffer_at(base + filling.slot.offset + start, align_up(m, DIRECT_ALIGN))], filling.offset + start)\n            read = min(read, m)\n")],
}
for name, patches in PATCHES.items():
    tree = ROOT / name
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree("src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for path, old, new in patches:
        p = tree / path
        text = p.read_text()
        assert text.count(old) == 1, (name, path, old[:60])
        p.write_text(text.replace(old, new))
    print("made", tree)
