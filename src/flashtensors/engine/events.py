"""The C loop's events, kept per device for the process's later loads, and a head start that makes them
on a thread while a cold load plans and loads the C loop's library.

Why: in a fresh process, the first CUDA event or stream the process makes costs 10-18 ms on the H200
machine, whichever of them comes first (``benches/probes/firstread.py``, twenty-second session: the
C loop's first ``cudaEventCreateWithFlags`` took 10.6-18.4 ms where no stream was made before it,
0.1 ms after torch's stream pool had paid it). Made by the read loop, that time sat between the load's
start and its first read, beside the library's load (5-10 ms); the Python loop, which makes its
streams while its first reads fly, began reading 27 ms earlier. Started at the load's start, the head
start runs them beside the load's plan, arena and views: the first read came 22.7 ms after the load's
start (median of 6 fresh processes), against 31.7 without it. That head start loaded the library
before it made the events, and the load waited 10.6-15.8 ms for them (docs/perf-notes.md,
twenty-second session). This one makes only the events, and the load's own thread loads the library
meanwhile: the load waited 0.01-0.26 ms for the events, and its first read came at 20.9 ms against
23.1 (twenty-third session), the library's load from a cold page cache (7-17 ms) now the longer step.

Events are made without timing, on one device each, and never destroyed: a load takes the ones it needs
and gives them back when its copies are done, so a later load makes none.
"""

from __future__ import annotations

import threading

from flashtensors.engine import devices

_lock = threading.Lock()
_free: dict[int, list[int]] = {}  # device index -> events no load holds
_starts: dict[int, threading.Thread] = {}  # device index -> its head start, while it runs


def _fill(index: int, count: int) -> None:
    """Make events on device ``index`` until ``count`` are free (fewer where the runtime refuses one)."""
    with _lock:
        if len(_free.get(index, [])) >= count:
            return  # the usual case after a process's first load: no runtime call
    rt = devices.runtime()
    if not rt.set_device(index):
        return
    while True:
        with _lock:
            if len(_free.setdefault(index, [])) >= count:
                return
        event = rt.create_event()
        if event is None:
            return
        with _lock:
            _free[index].append(event)


def head_start(index: int, count: int) -> None:
    """Start a thread that makes events on device ``index`` until ``count`` are free, unless they are
    or a head start for that device runs. Returns at once; whatever the thread could not do (a runtime
    that cannot be called directly, an event refused) is left to :func:`take`, which the read loop
    calls and which says so."""
    with _lock:
        if index in _starts or len(_free.get(index, [])) >= count:
            return
        thread = threading.Thread(target=_run, args=(index, count), name="flash-head-start")
        thread.daemon = True
        _starts[index] = thread
    try:
        thread.start()
    except RuntimeError:  # no thread to be had: the load's take makes the events itself
        with _lock:
            _starts.pop(index, None)


def _run(index: int, count: int) -> None:
    try:
        _fill(index, count)
    except Exception:  # a head start only saves time: take() runs the same calls on the load's thread,
        pass  # where an error is raised to the caller
    finally:
        with _lock:
            _starts.pop(index, None)


def take(index: int, count: int) -> list[int] | None:
    """``count`` events of device ``index`` (the caller's current device) for one load, once its head
    start, if one runs, is done; any still missing are made now. None where the runtime cannot make
    them: the read loop then leaves the load to the Python loop. Give them back with :func:`give`
    once their copies are done."""
    with _lock:
        thread = _starts.get(index)
    if thread is not None:
        thread.join()
    _fill(index, count)
    with _lock:
        free = _free.setdefault(index, [])
        if len(free) < count:
            return None
        taken, _free[index] = free[:count], free[count:]
    return taken


def give(index: int, events: list[int]) -> None:
    """Events from :func:`take` back to device ``index``'s free list, for a later load."""
    with _lock:
        _free.setdefault(index, []).extend(events)
