"""Per-model fcntl locks: one writer (pull, rm) or many readers (verify) at a time, across processes.

flock locks die with their process, so a pull killed with SIGKILL never leaves a model locked. Lock files
are never deleted: removing a lock file someone may be waiting on would let two holders in at once.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flashtensors.store.layout import ModelRef, StoreLayout


def _open_lock(layout: StoreLayout, ref: ModelRef) -> int:
    layout.locks.mkdir(parents=True, exist_ok=True)
    return os.open(layout.lock_path(ref), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


@contextmanager
def model_lock(
    layout: StoreLayout,
    ref: ModelRef,
    *,
    shared: bool = False,
    on_wait: Callable[[], None] | None = None,
) -> Iterator[None]:
    """Hold the lock of one model name for the body of a ``with`` block.

    Args:
        layout: the store.
        ref: the model (its revision is ignored: one lock per name).
        shared: take a shared (reader) lock instead of an exclusive one.
        on_wait: called once if the lock is busy, before blocking (to tell the user why we wait).
    """
    fd = _open_lock(layout, ref)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def try_model_lock(layout: StoreLayout, ref: ModelRef) -> int | None:
    """Take the exclusive lock without waiting; returns the descriptor to close, or None if busy."""
    fd = _open_lock(layout, ref)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
