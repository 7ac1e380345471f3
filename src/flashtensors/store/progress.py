"""Progress of a pull, on stderr: rich bars on a terminal, one plain line per file elsewhere."""

from __future__ import annotations

import sys
import threading
from typing import Any, Protocol, TextIO


def human_size(nbytes: int | float) -> str:
    """Decimal units, the way download sizes are usually shown: ``1.2 GB``, ``532 MB``, ``17 B``."""
    value = float(nbytes)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


class Progress(Protocol):
    """What a pull reports. Methods may be called from several download threads at once."""

    def message(self, text: str) -> None: ...

    def start_file(self, name: str, total: int | None, *, verb: str) -> None: ...

    def advance(self, name: str, nbytes: int) -> None: ...

    def end_file(self, name: str) -> None: ...

    def close(self) -> None: ...


class NullProgress:
    """Reports nothing (``pull(..., progress=False)``)."""

    def message(self, text: str) -> None:
        return None

    def start_file(self, name: str, total: int | None, *, verb: str) -> None:
        return None

    def advance(self, name: str, nbytes: int) -> None:
        return None

    def end_file(self, name: str) -> None:
        return None

    def close(self) -> None:
        return None


class LineProgress:
    """One line per finished file: what logs and pipes want (no carriage returns, no bars)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._files: dict[str, list[Any]] = {}  # name -> [verb, bytes done]

    def _print(self, text: str) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        print(text, file=stream, flush=True)

    def message(self, text: str) -> None:
        with self._lock:
            self._print(text)

    def start_file(self, name: str, total: int | None, *, verb: str) -> None:
        with self._lock:
            self._files[name] = [verb, 0]

    def advance(self, name: str, nbytes: int) -> None:
        with self._lock:
            if name in self._files:
                self._files[name][1] += nbytes

    def end_file(self, name: str) -> None:
        with self._lock:
            entry = self._files.pop(name, None)
            if entry is not None:
                self._print(f"{entry[0]} {name} ({human_size(entry[1])})")

    def close(self) -> None:
        return None


class RichProgress:
    """Bars on stderr, one per file in flight, removed when the pull ends."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._console = Console(stderr=True)
        self._bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self._console,
            transient=True,
        )
        self._tasks: dict[str, list[Any]] = {}  # name -> [task id, verb, bytes done]
        self._lock = threading.Lock()
        self._bars.start()

    def message(self, text: str) -> None:
        self._bars.console.print(text, highlight=False, markup=False)

    def start_file(self, name: str, total: int | None, *, verb: str) -> None:
        with self._lock:
            self._tasks[name] = [self._bars.add_task(f"{verb} {name}", total=total), verb, 0]

    def advance(self, name: str, nbytes: int) -> None:
        with self._lock:
            entry = self._tasks.get(name)
            if entry is None:
                return
            entry[2] += nbytes
        self._bars.advance(entry[0], nbytes)

    def end_file(self, name: str) -> None:
        with self._lock:
            entry = self._tasks.pop(name, None)
        if entry is not None:
            self._bars.remove_task(entry[0])
            self.message(f"{entry[1]} {name} ({human_size(entry[2])})")

    def close(self) -> None:
        self._bars.stop()


def make_progress(progress: bool | Progress) -> Progress:
    """``True``: bars when stderr is a terminal, else lines; ``False``: silent; an object: used as is."""
    if progress is True:
        return RichProgress() if sys.stderr.isatty() else LineProgress()
    if progress is False:
        return NullProgress()
    return progress
