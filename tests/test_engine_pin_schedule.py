"""The warm path's pinning schedule (pure arithmetic: runs on CPU)."""

from __future__ import annotations

from itertools import pairwise

import pytest

from flashtensors.engine.pinned_mmap import pin_schedule

MiB, GiB = 1024**2, 1024**3


@pytest.mark.parametrize(
    "lengths",
    [
        [1_192_000_000],  # Qwen3-0.6B shape, one file
        [4_000_000_000, 4_044_936_192],  # 4B, two files
        [4_100_000_000] * 3 + [4_080_000_000],  # 8B
        [5 * MiB + 123, 0, 70 * MiB],  # small and empty regions
    ],
)
def test_schedule_covers_every_byte_in_pieces_that_start_on_pages(lengths: list[int]) -> None:
    cap = GiB
    schedule = pin_schedule(lengths, cap)
    assert [sum(p) for p in schedule] == lengths
    flat = [n for pieces in schedule for n in pieces]
    assert all(0 < n <= cap for n in flat)
    for pieces in schedule:  # every piece but a region's last ends on a page, so the next starts on one
        assert all(n % 4096 == 0 for n in pieces[:-1])
    assert flat[0] <= 64 * MiB  # the first copy starts after a short pin


def test_pieces_grow_then_shrink_so_little_dma_is_left_after_the_last_pin() -> None:
    lengths = [4_100_000_000] * 3 + [4_080_000_000]
    flat = [n for pieces in pin_schedule(lengths, GiB) for n in pieces]
    assert flat[0] == 64 * MiB and flat[1] == GiB
    assert flat[-1] <= 64 * MiB  # was up to 1 GiB: 19 ms of DMA after the last pin at 55 GB/s
    top = flat.index(max(flat))
    tail = flat[top:]
    # Shrinking, except where a file boundary cuts a piece short.
    cut = {sum(len(p) for p in pin_schedule(lengths, GiB)[: i + 1]) - 1 for i in range(len(lengths))}
    for i, (a, b) in enumerate(pairwise(tail)):
        assert b <= a or (top + i) in cut
    assert len(flat) < 40  # a call costs ~nothing, but not thousands of them


def test_a_small_cap_is_respected() -> None:
    schedule = pin_schedule([10 * MiB + 5], MiB)
    assert schedule == [[MiB] * 10 + [5]]


@pytest.mark.parametrize("seed", range(40))
def test_front_and_back_together_take_every_byte_once(seed: int) -> None:
    """The pinning thread (front) and the ring's readers (back) share a load: whatever the interleaving,
    the pieces tile every region exactly, stay within one region, and every piece the front takes
    starts on a page of its file."""
    import random

    from flashtensors.engine.pinned_mmap import _piece
    from flashtensors.engine.readers import Split

    rng = random.Random(seed)
    spans = []
    for _ in range(rng.randint(1, 5)):
        start = 4096 * rng.randint(0, 3)
        spans.append((start, start + rng.choice([0, rng.randint(1, 40 * MiB), rng.randint(1, 300 * MiB)])))
    split = Split(spans)
    taken: list[list[tuple[int, int]]] = [[] for _ in spans]
    from_front: list[list[int]] = [[] for _ in spans]
    first, slot = True, rng.choice([64 * 1024, MiB, 16 * MiB])
    while True:
        if rng.random() < 0.3:
            piece = split.front(_piece(first, split.left, rng.choice([MiB, 256 * MiB, GiB])))
            if piece is not None:
                first = False
                assert piece[1] % 4096 == 0
                from_front[piece[0]].append(piece[2])
        else:
            piece = split.back(slot)
            if piece is not None:
                assert 0 < piece[2] <= slot
        if piece is None:
            assert split.left == 0
            break
        i, offset, n = piece
        taken[i].append((offset, n))
    assert split.front(MiB) is None and split.back(MiB) is None
    for (start, end), pieces in zip(spans, taken, strict=True):
        pos = start
        for offset, n in sorted(pieces):
            assert offset == pos and n > 0
            pos += n
        assert pos == end
    assert split.front_bytes == [sum(fronts) for fronts in from_front]


def test_a_closed_split_gives_nothing_more() -> None:
    from flashtensors.engine.readers import Split

    split = Split([(0, 10 * MiB)])
    assert split.front(MiB) == (0, 0, MiB)
    assert split.back(MiB) == (0, 9 * MiB, MiB)
    split.close()
    assert split.front(MiB) is None and split.back(MiB) is None and split.left == 0
