"""The reader pool: the calling thread's side task runs while the jobs run, and errors reach the caller."""

from __future__ import annotations

import threading

import pytest

from flashtensors.engine.readers import _Job, _run_parallel


def _jobs(n: int) -> list[_Job]:
    return [_Job(fd=-1, file_offset=i, length=1, useful=1, arena_offset=i) for i in range(n)]


def test_meanwhile_overlaps_the_jobs() -> None:
    # The side task waits for a job to start and the jobs wait for the side task to start: this
    # finishes only if both run at once (each wait has a timeout, so a failure does not hang).
    job_started, side_started = threading.Event(), threading.Event()
    done: list[int] = []

    def job(j: _Job) -> None:
        job_started.set()
        assert side_started.wait(10)
        done.append(j.file_offset)

    def side() -> None:
        side_started.set()
        assert job_started.wait(10)

    _run_parallel(job, _jobs(6), 3, meanwhile=side)
    assert sorted(done) == list(range(6))


def test_job_errors_propagate_after_meanwhile() -> None:
    ran: list[str] = []

    def job(j: _Job) -> None:
        if j.file_offset == 2:
            raise OSError(5, "disk said no")

    with pytest.raises(OSError, match="disk said no"):
        _run_parallel(job, _jobs(4), 2, meanwhile=lambda: ran.append("side"))
    assert ran == ["side"]


def test_meanwhile_errors_propagate_once_the_jobs_are_done() -> None:
    done: list[int] = []

    def side() -> None:
        raise RuntimeError("no streams")

    with pytest.raises(RuntimeError, match="no streams"):
        _run_parallel(lambda j: done.append(j.file_offset), _jobs(5), 2, meanwhile=side)
    assert sorted(done) == list(range(5))


def test_every_reader_is_started_before_the_first_job() -> None:
    """Readers start gated: a thread started while others already read waits for the GIL (tens of ms)."""
    alive_at_first_job: list[int] = []
    lock = threading.Lock()

    def job(j: _Job) -> None:
        with lock:
            if not alive_at_first_job:
                alive_at_first_job.append(
                    sum(t.name.startswith("flash-read-") for t in threading.enumerate())
                )

    _run_parallel(job, _jobs(20), 4)
    assert alive_at_first_job == [4]
    assert not [t for t in threading.enumerate() if t.name.startswith("flash-read-")]


def test_a_thread_that_cannot_start_leaves_no_worker_running(monkeypatch: pytest.MonkeyPatch) -> None:
    from flashtensors.engine import readers

    started = 0
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        nonlocal started
        if started == 2:
            raise RuntimeError("can't start new thread")
        started += 1
        real_start(self)

    ran: list[int] = []
    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        readers._run_parallel(lambda j: ran.append(j.file_offset), _jobs(6), 4)
    monkeypatch.undo()
    assert ran == []  # the two started threads ended without taking a job
    assert not [t for t in threading.enumerate() if t.name.startswith("flash-read-")]


def test_ring_claims_cover_each_region_once_in_order() -> None:
    """The cold ring's claims (a Split taken from the front only): front to back, one region at a time,
    never more than asked, each chunk starting on a 4 KiB file offset where the region does and the size
    asked is a multiple of it."""
    from flashtensors.engine.readers import Split

    spans = [(0, 10 * 4096 + 100), (4096, 4096), (8192, 8192 + 3 * 4096)]  # the middle one is empty
    claims = Split(spans)
    got = []
    while (c := claims.front(4 * 4096)) is not None:
        got.append(c)
    assert claims.front(4096) is None
    assert got == [
        (0, 0, 4 * 4096),
        (0, 4 * 4096, 4 * 4096),
        (0, 8 * 4096, 2 * 4096 + 100),
        (2, 8192, 3 * 4096),
    ]
