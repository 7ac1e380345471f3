"""The stream pool's hand-out order, on CPU (streams replaced by plain objects)."""

from __future__ import annotations

import pytest
import torch

from flashtensors.engine import streams


@pytest.fixture
def fake_pool(monkeypatch: pytest.MonkeyPatch) -> torch.device:
    device = torch.device("cuda", 7)  # never touched: new_stream is replaced below
    monkeypatch.setattr(streams.devices, "new_stream", lambda dev: object())
    monkeypatch.setattr(streams, "_pool", {})
    monkeypatch.setattr(streams, "_pool_turn", {})
    return device


def test_streams_are_handed_out_in_turn_up_to_the_cap(fake_pool: torch.device) -> None:
    got = [streams.pooled_stream(fake_pool) for _ in range(2 * streams._STREAMS_PER_DEVICE)]
    first = got[: streams._STREAMS_PER_DEVICE]
    assert len({id(s) for s in first}) == streams._STREAMS_PER_DEVICE
    assert got[streams._STREAMS_PER_DEVICE :] == first


@pytest.mark.parametrize("made", [1, 5, 16], ids=["one-made", "some-made", "pool-full"])
def test_the_stream_to_avoid_is_skipped(fake_pool: torch.device, made: int) -> None:
    """The warm split's ring asks for a stream other than the pinning thread's own, whose turn it may be."""
    streams.make_streams(fake_pool, made)  # made ahead, as prime_copies does: the turn starts at 0
    pool = streams._pool[fake_pool]
    for _ in range(3 * streams._STREAMS_PER_DEVICE):
        turn = streams._pool_turn.get(fake_pool, 0)
        due = pool[turn % len(pool)]  # what a plain hand-out would give, or an existing stream
        got = streams.pooled_stream(fake_pool, avoid=due)
        assert got is not due
        assert got in pool
