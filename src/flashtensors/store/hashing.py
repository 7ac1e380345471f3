"""Streamed file hashes (xxh3-128): fast enough to hash while copying at disk speed."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import xxhash

HASH_ALGORITHM = "xxh3_128"
_CHUNK = 8 * 1024 * 1024

Advance = Callable[[int], None]


def _noop(_n: int) -> None:
    return None


def hash_file(path: Path, *, advance: Advance = _noop) -> tuple[int, str]:
    """Hash one file in chunks.

    Args:
        path: the file.
        advance: called with the byte count of each chunk read (progress).

    Returns:
        ``(size in bytes, hex digest)``.
    """
    h = xxhash.xxh3_128()
    size = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            h.update(view[:n])
            size += n
            advance(n)
    return size, h.hexdigest()


def copy_and_hash(
    src: Path,
    dst: Path,
    *,
    advance: Advance = _noop,
    on_chunk: Callable[[], None] | None = None,
) -> tuple[int, str]:
    """Copy ``src`` to a new file ``dst`` and hash the bytes on the way; ``dst`` is fsynced.

    Args:
        src: file to read.
        dst: file to create (must not exist).
        advance: called with the byte count of each chunk written (progress).
        on_chunk: called after each chunk is written (lets tests stop a copy half way).

    Returns:
        ``(size in bytes, hex digest)`` of what was written.
    """
    h = xxhash.xxh3_128()
    size = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(src, "rb", buffering=0) as fin, open(dst, "xb", buffering=0) as fout:
        while n := fin.readinto(view):
            chunk = view[:n]
            h.update(chunk)
            written = 0
            while written < n:
                written += fout.write(chunk[written:])
            size += n
            advance(n)
            if on_chunk is not None:
                on_chunk()
        os.fsync(fout.fileno())
    return size, h.hexdigest()
