"""The staging ring sized by the load (``ring_size`` auto): two slots per O_DIRECT reader, four for a
load of BIG_LOAD cold bytes or more, grown once per process for the widest load seen. A fixed
``ring_size`` still wins."""

from __future__ import annotations

import pytest

import flashtensors as ft
from flashtensors.config import get_settings, reset_settings
from flashtensors.engine import staging

KiB = 1024


@pytest.fixture
def no_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's staging ring forgotten for the test (an earlier test may have grown one)."""
    monkeypatch.setattr(staging, "_rings", {})


def test_auto_is_the_default_and_a_word_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert get_settings().ring_size == 0
    monkeypatch.setenv("FLASH_RING_SIZE", "AUTO")
    reset_settings()
    assert get_settings().ring_size == 0
    monkeypatch.setenv("FLASH_RING_SIZE", "384M")
    reset_settings()
    assert get_settings().ring_size == 384 * 1024**2


def test_slots_by_readers_and_cold_bytes() -> None:
    settings = ft.configure(chunk_size=16 * 1024**2)
    assert staging.ring_slots(settings, 8, staging.BIG_LOAD - 1) == 16  # 256 MiB
    assert staging.ring_slots(settings, 8, staging.BIG_LOAD) == 32  # 512 MiB
    assert staging.ring_slots(settings, 2, staging.BIG_LOAD) == staging.RING_MIN_SLOTS
    assert staging.ring_slots(settings) == staging.RING_MIN_SLOTS  # the warm and buffered paths
    assert staging.ring_slots(settings, 32, staging.BIG_LOAD) == 64  # 1 GiB, the most


def test_direct_reads_get_one_and_a_half_slots_per_reader() -> None:
    """With ``read_size`` auto, the O_DIRECT ring holds 1.5 slots per reader whatever the load's size
    (reads that land in few places are faster on the lent disks); a fixed ``ring_size`` still rules."""
    settings = ft.configure(chunk_size=16 * 1024**2)
    slot = staging.direct_slot_size(settings)
    assert slot == 512 * KiB
    assert staging.ring_slots(settings, 16, 1, slot, direct=True) == 24
    assert staging.ring_slots(settings, 16, staging.BIG_LOAD, slot, direct=True) == 24
    assert staging.ring_slots(settings, 8, staging.BIG_LOAD, slot, direct=True) == 12
    assert staging.ring_slots(settings, 1, 1, slot, direct=True) == 2  # a slot being read, one being copied
    assert staging.ring_slots(settings, 16, staging.BIG_LOAD, slot) == 64  # the other rings' rule
    fixed = ft.configure(chunk_size=1024**2, ring_size=8 * 1024**2)
    assert staging.ring_slots(fixed, 16, 1, slot, direct=True) == 16


def test_auto_ring_is_at_most_one_gib() -> None:
    settings = ft.configure(chunk_size=128 * 1024**2)
    assert staging.ring_slots(settings, 8, staging.BIG_LOAD) == 8  # 1 GiB of 128 MiB slots, not 32


def test_auto_ring_grows_for_a_big_load_and_keeps_the_largest(no_ring: None) -> None:
    settings = ft.configure(chunk_size=64 * KiB)
    small = staging.staging_ring(settings, 8, 1)
    assert len(small.slots) == 16
    big = staging.staging_ring(settings, 8, staging.BIG_LOAD)
    assert big is not small and len(big.slots) == 32
    assert staging.staging_ring(settings, 8, 1) is big  # a smaller load reuses the larger ring
    assert staging.staging_ring(settings) is big  # so do the warm and buffered paths
    assert all(s.offset == i * 64 * KiB for i, s in enumerate(big.slots))


def test_a_fixed_ring_size_does_not_grow(no_ring: None) -> None:
    settings = ft.configure(chunk_size=64 * KiB, ring_size=320 * KiB)
    ring = staging.staging_ring(settings, 8, staging.BIG_LOAD)
    assert len(ring.slots) == 5
    assert staging.staging_ring(settings, 64, staging.BIG_LOAD) is ring


def test_direct_reads_get_small_slots_only_with_read_size_auto() -> None:
    assert staging.direct_slot_size(ft.configure(chunk_size=16 * 1024**2)) == staging.DIRECT_SLOT
    assert staging.direct_slot_size(ft.configure(chunk_size=256 * KiB)) == 256 * KiB  # never above chunk_size
    settings = ft.configure(chunk_size=16 * 1024**2, read_size=512 * KiB)  # the user's sizes stand
    assert staging.direct_slot_size(settings) == 16 * 1024**2


def test_the_direct_ring_and_the_chunk_ring_live_side_by_side(no_ring: None) -> None:
    settings = ft.configure(chunk_size=16 * 1024**2)
    direct = staging.staging_ring(settings, 16, 1, staging.direct_slot_size(settings), direct=True)
    buffered = staging.staging_ring(settings)
    assert (direct.slot_size, buffered.slot_size) == (staging.DIRECT_SLOT, 16 * 1024**2)
    assert len(direct.slots) == 24  # 1.5 per reader, of 512 KiB
    # a warm load after a cold one (and the other way round) keeps the other's ring and its pinned slots
    assert staging.staging_ring(settings, 16, 1, staging.DIRECT_SLOT, direct=True) is direct
    assert staging.staging_ring(settings) is buffered
    # new settings let go of the ring whose slots they no longer use, and only that one
    settings = ft.configure(chunk_size=8 * 1024**2)
    assert staging.staging_ring(settings, 16, 1, staging.DIRECT_SLOT, direct=True) is direct
    assert staging.staging_ring(settings).slot_size == 8 * 1024**2
    assert sorted(staging._rings) == [staging.DIRECT_SLOT, 8 * 1024**2]
    settings = ft.configure(chunk_size=8 * 1024**2, ring_size=64 * 1024**2)  # a fixed size: new rings
    fixed = staging.staging_ring(settings, 16, 1, staging.DIRECT_SLOT, direct=True)
    assert fixed is not direct and len(fixed.slots) == 128


def test_the_ring_is_ready_only_with_every_slot_pinned_under_the_same_settings(no_ring: None) -> None:
    settings = ft.configure(chunk_size=64 * KiB, ring_size=256 * KiB)
    assert not staging.ring_is_ready(settings)  # no ring yet
    ring = staging.staging_ring(settings)
    assert not staging.ring_is_ready(settings)
    for slot in ring.slots:
        slot.pinned = True  # as the feeder marks a slot once it has pinned it
    assert staging.ring_is_ready(settings)
    assert not staging.ring_is_ready(ft.configure(chunk_size=64 * KiB, ring_size=512 * KiB))  # not its ring
    direct = staging.staging_ring(settings, 16, 1, staging.direct_slot_size(settings))
    assert direct is ring  # chunks of 64 KiB: the O_DIRECT reads share the one ring
