"""The staging ring: pinned host slots that cold and buffered reads fill on their way to a GPU, one ring
per process, and the rule that sizes it (``ring_size`` auto). Reader threads fill its slots and the
loading thread copies them (:mod:`flashtensors.engine.ring_feeder`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from flashtensors.config import Settings
from flashtensors.engine import devices


@dataclass
class Slot:
    offset: int  # in the ring's buffer
    pinned: bool = False  # pinned before its first copy
    tensor: torch.Tensor | None = None  # only where copies go through torch (no direct runtime calls)
    event: torch.cuda.Event | None = None


@dataclass
class StagingRing:
    """Pinned host slots, allocated once per process and reused: pinning fresh memory is slow (1.4 GB/s).

    Reads go into a slot by address. A slot is pinned only before its first copy, by the thread that
    queues the copies (``buffer.pin``, in :class:`flashtensors.engine.ring_feeder.RingFeeder`): the first
    reads start without waiting for the ring.
    """

    slot_size: int
    buffer: devices.PinnedBuffer
    slots: list[Slot] = field(default_factory=list)
    # One load at a time owns the slots; concurrent loads through the ring take turns (they would share
    # the disk and the copy engine anyway).
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def allocate(cls, ring_size: int, slot_size: int) -> StagingRing:
        count = max(2, ring_size // slot_size)
        buf = devices.PinnedBuffer(count * slot_size, piece=slot_size)
        slots = [Slot(i * slot_size) for i in range(count)]
        return cls(slot_size, buf, slots)


# Per slot size: (the ring_size setting it was made for, the ring). At most two: the ring of chunk_size
# slots (buffered reads, a warm load's tail) and that of the O_DIRECT path's slots (direct_slot_size).
_rings: dict[int, tuple[int, StagingRing]] = {}
_ring_lock = threading.Lock()

# With read_size auto, O_DIRECT reads go through slots of at most this size, one request each, in a ring of
# DIRECT_SLOTS_PER_READER slots per reader. 512 KiB requests read fastest: 16 readers x 512 KiB 1.86 GB/s
# against 8 readers x whole 16 MiB chunks 1.74 (H100 machine, 4B cold, 5 rounds; raw 16 x 512 KiB 2.02;
# fourteenth session). On these machines' virtual disks, reads that land in less memory are faster: raw
# 16 x 512 KiB O_DIRECT reads of 4B, each thread cycling through 1, 2 or 3 places of its own, 2.84, 2.65,
# 2.29 GB/s (H200 machine, 4 rounds). Ours in the same lease: a ring of 24 slots (12 MiB) 2.82 GB/s;
# 48 slots 2.61; 18 slots 2.06 (16 readers wait for the two spare ones); 4 MiB slots in a 128 MiB ring
# 2.39 (seventeenth session). `flash bench` cold on the H200, 8B: 2.26 GB/s (89% of the disk) against
# 2.13 (87%) with 4 MiB slots (eighteenth session; docs/perf-notes.md has all of them).
DIRECT_SLOT = 512 * 1024
DIRECT_SLOTS_PER_READER = 1.5

# With ring_size auto (0): a load of BIG_LOAD cold bytes or more gets BIG_SLOTS_PER_READER slots per
# O_DIRECT reader, a smaller one SMALL_SLOTS_PER_READER, never fewer than RING_MIN_SLOTS (256 MiB of 16
# MiB slots, the earlier fixed default; the warm and buffered paths' readers use the ring too). Measured
# on the H100 machine against fastsafetensors, round by round (perf-notes, eleventh session): with 8
# readers, a 512 MiB ring won 4B 5 of 5 rounds (1.07x) and 8B 4 of 4 (1.06x); 256 MiB won 4B 6 of 19
# (0.98x). 16 readers with 512 MiB did no better (4B 19 of 24, 8B 1 of 6). Within a load the ring is
# never short, though (twelfth session, benches/probes/ringwait.py: no reader waited for a slot with 256
# or 512 MiB), so the 4B rounds may have been noise between calls; the rule stays, as 8B held (7 of 7).
# Since the fourteenth session the readers take the slot freed last, so a load uses only the few slots
# its copies keep releasing (peak RSS +35-68 MiB with a 1 GiB ring): the size bounds what a load may use.
# Since the fifteenth session O_DIRECT reads (read_size auto) use slots of DIRECT_SLOT in a ring of
# their own; since the seventeenth its size follows DIRECT_SLOTS_PER_READER, not this rule.
BIG_LOAD = 4 * 1024**3
SMALL_SLOTS_PER_READER, BIG_SLOTS_PER_READER = 2, 4
RING_MIN_SLOTS = 16


def direct_slot_size(settings: Settings) -> int:
    """The slot size of O_DIRECT reads through the ring: at most :data:`DIRECT_SLOT` with ``read_size``
    auto, else ``chunk_size`` (a ``read_size`` set by the user keeps the slots of ``chunk_size``)."""
    return settings.chunk_size if settings.read_size else min(settings.chunk_size, DIRECT_SLOT)


def ring_slots(
    settings: Settings, readers: int = 0, nbytes: int = 0, slot_size: int = 0, direct: bool = False
) -> int:
    """Slots of ``slot_size`` (0: ``chunk_size``) a staging ring needs for ``readers`` reader threads
    reading ``nbytes``: ``ring_size`` fixes the count. Auto: for O_DIRECT reads in slots of
    :func:`direct_slot_size` with ``read_size`` auto (``direct``), :data:`DIRECT_SLOTS_PER_READER` per
    reader, so the reads land in few places; otherwise :data:`SMALL_SLOTS_PER_READER` per reader,
    :data:`BIG_SLOTS_PER_READER` from :data:`BIG_LOAD` bytes, at least :data:`RING_MIN_SLOTS`, at most
    1 GiB of them (two at the least)."""
    slot_size = slot_size or settings.chunk_size
    if settings.ring_size:
        return max(2, settings.ring_size // slot_size)
    if direct:
        return max(2, int(readers * DIRECT_SLOTS_PER_READER))
    most = max(2, 1024**3 // slot_size)
    per_reader = BIG_SLOTS_PER_READER if nbytes >= BIG_LOAD else SMALL_SLOTS_PER_READER
    return min(most, max(RING_MIN_SLOTS, per_reader * readers))


def ring_is_ready(settings: Settings) -> bool:
    """Whether this process's staging ring of ``chunk_size`` slots (the warm and buffered paths') exists
    with every slot already pinned."""
    with _ring_lock:
        made_for, ring = _rings.get(settings.chunk_size, (-1, None))
    return ring is not None and made_for == settings.ring_size and all(s.pinned for s in ring.slots)


def staging_ring(
    settings: Settings, readers: int = 0, nbytes: int = 0, slot_size: int = 0, direct: bool = False
) -> StagingRing:
    """This process's staging ring of ``slot_size`` slots (0: ``chunk_size``), with at least
    :func:`ring_slots` of them for ``readers`` reading ``nbytes`` (``direct``: see there).

    One ring per slot size, and only for the two sizes that ``settings`` use (``chunk_size`` and
    :func:`direct_slot_size`; one ring where they are equal): a ring is allocated when the settings
    change, or (``ring_size`` auto) when a load needs more slots than it has; a smaller load then
    reuses the larger ring. A load still holding a replaced ring keeps it until it is done.
    """
    slot_size = slot_size or settings.chunk_size
    want = ring_slots(settings, readers, nbytes, slot_size, direct)
    with _ring_lock:
        keep = {settings.chunk_size, direct_slot_size(settings)}
        for size, (made_for, _) in list(_rings.items()):
            if size not in keep or made_for != settings.ring_size:
                del _rings[size]  # settings changed: let the old ring go
        ring = _rings[slot_size][1] if slot_size in _rings else None
        if ring is None or len(ring.slots) < want:
            ring = StagingRing.allocate(want * slot_size, slot_size)  # new, or grown
            _rings[slot_size] = (settings.ring_size, ring)
        return ring
