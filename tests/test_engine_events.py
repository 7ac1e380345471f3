"""The C loop's events (:mod:`flashtensors.engine.events`) with a stand-in runtime, on the CPU: the head
start makes them on its own thread; a load's take waits for it, gets distinct
events and makes none twice; events given back serve the next load; a runtime that refuses leaves the
load to the Python loop (None), and a failed head start is made up by the take."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from flashtensors.engine import devices, events


class StandIn:
    """cudaSetDevice and cudaEventCreateWithFlags: each event a new number, with the thread and device
    it was made on; ``refuse_after`` events then None; ``gate`` holds the head start's first event."""

    def __init__(self, refuse_after: int | None = None, callable_directly: bool = True) -> None:
        self.made: dict[int, tuple[str, int]] = {}
        self.device: dict[str, int] = {}
        self.refuse_after = refuse_after
        self.lib = object() if callable_directly else None
        self.gate: threading.Event | None = None
        self.raise_on: str | None = None  # a thread whose cudaSetDevice raises
        self.set_devices = 0

    def set_device(self, index: int) -> bool:
        self.set_devices += 1
        if self.raise_on == threading.current_thread().name:
            raise OSError("the runtime could not be called")
        if self.lib is None:
            return False
        self.device[threading.current_thread().name] = index
        return True

    def create_event(self) -> int | None:
        name = threading.current_thread().name
        if self.gate is not None and name == "flash-head-start":
            self.gate.wait()
        if self.refuse_after is not None and len(self.made) >= self.refuse_after:
            return None
        event = 1000 + len(self.made)
        self.made[event] = (name, self.device[name])
        return event


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(events, "_free", {})
    monkeypatch.setattr(events, "_starts", {})
    yield


def use(monkeypatch: pytest.MonkeyPatch, runtime: StandIn) -> StandIn:
    monkeypatch.setattr(devices, "_runtime", runtime)
    return runtime


def finish_head_starts() -> None:
    for thread in list(events._starts.values()):
        thread.join()


def test_the_head_start_makes_the_events_on_its_own_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    rt = use(monkeypatch, StandIn())
    events.head_start(1, 16)
    finish_head_starts()
    assert len(rt.made) == 16 and set(rt.made.values()) == {("flash-head-start", 1)}
    taken = events.take(1, 16)
    assert taken is not None and sorted(taken) == sorted(rt.made)
    assert len(rt.made) == 16  # the take made none


def test_a_take_waits_for_the_head_start_and_makes_nothing_it_made(monkeypatch: pytest.MonkeyPatch) -> None:
    rt = use(monkeypatch, StandIn())
    rt.gate = threading.Event()
    events.head_start(0, 16)
    start = events._starts[0]
    joining = threading.Event()
    real_join = start.join

    def join(timeout: float | None = None) -> None:
        joining.set()
        real_join(timeout)

    monkeypatch.setattr(start, "join", join)
    got: list[list[int] | None] = []
    taker = threading.Thread(target=lambda: got.append(events.take(0, 16)), name="a-load")
    taker.start()
    assert joining.wait(timeout=30), "the take did not wait for the head start"
    assert rt.made == {}  # the head start is held at its first event, and the take made none meanwhile
    rt.gate.set()
    taker.join()
    assert got[0] is not None and len(got[0]) == 16
    assert {thread for thread, _ in rt.made.values()} == {"flash-head-start"}


def test_events_given_back_serve_the_next_load_and_no_head_start_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt = use(monkeypatch, StandIn())
    first = events.take(0, 16)
    assert first is not None and len(set(first)) == 16
    assert {thread for thread, _ in rt.made.values()} == {threading.current_thread().name}
    events.give(0, first)
    calls = rt.set_devices
    events.head_start(0, 16)
    assert events._starts == {}  # 16 free already: nothing to start
    second = events.take(0, 16)
    assert second is not None and sorted(second) == sorted(first)
    assert len(rt.made) == 16 and rt.set_devices == calls  # no runtime call at all


def test_loads_at_once_get_distinct_events(monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, StandIn())
    events.head_start(0, 16)
    a, b = events.take(0, 8), events.take(0, 8)
    c = events.take(0, 4)  # more than the head start made: made now
    assert a is not None and b is not None and c is not None
    assert len(set(a) | set(b) | set(c)) == 20
    events.give(0, a)
    d = events.take(0, 8)
    assert d is not None and sorted(d) == sorted(a)


def test_devices_keep_their_own_events(monkeypatch: pytest.MonkeyPatch) -> None:
    rt = use(monkeypatch, StandIn())
    events.head_start(0, 4)
    events.head_start(1, 4)
    finish_head_starts()
    zero, one = events.take(0, 4), events.take(1, 4)
    assert zero is not None and one is not None
    assert {rt.made[e][1] for e in zero} == {0} and {rt.made[e][1] for e in one} == {1}


def test_a_refused_event_leaves_the_load_to_the_python_loop_and_keeps_the_ones_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt = use(monkeypatch, StandIn(refuse_after=5))
    events.head_start(0, 16)
    assert events.take(0, 16) is None
    kept = events.take(0, 5)
    assert kept is not None and sorted(kept) == sorted(rt.made)


def test_a_runtime_not_callable_directly_makes_no_events(monkeypatch: pytest.MonkeyPatch) -> None:
    rt = use(monkeypatch, StandIn(callable_directly=False))
    events.head_start(0, 16)
    finish_head_starts()
    assert events.take(0, 16) is None and rt.made == {}


def test_a_failed_head_start_is_made_up_by_the_take(monkeypatch: pytest.MonkeyPatch) -> None:
    rt = use(monkeypatch, StandIn())
    rt.raise_on = "flash-head-start"
    events.head_start(0, 16)
    finish_head_starts()
    assert rt.made == {} and events._starts == {}
    taken = events.take(0, 16)
    assert taken is not None and len(taken) == 16
    assert {thread for thread, _ in rt.made.values()} == {threading.current_thread().name}


def test_a_head_start_with_no_thread_to_be_had_leaves_the_events_to_the_take(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt = use(monkeypatch, StandIn())

    def refused(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refused)
    events.head_start(0, 16)
    assert events._starts == {}
    monkeypatch.undo()  # back to real threads (and to the fixture's state, set again below)
    monkeypatch.setattr(events, "_free", {})
    monkeypatch.setattr(events, "_starts", {})
    use(monkeypatch, rt)
    taken = events.take(0, 16)
    assert taken is not None and len(taken) == 16
    assert {thread for thread, _ in rt.made.values()} == {threading.current_thread().name}
