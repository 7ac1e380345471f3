"""Simulate a filesystem without O_DIRECT by wrapping the ``os`` functions every reader goes through."""

from __future__ import annotations

import errno
import os

import pytest


class NoDirect:
    """Stands in for a filesystem without O_DIRECT (old tmpfs, FUSE, NFS): it either refuses the open
    or, like some FUSE mounts, accepts it and fails every read with EINVAL."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at_open: bool) -> None:
        self.direct_fds: set[int] = set()
        real_open = os.open

        def fake_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
            if flags & os.O_DIRECT:
                if at_open:
                    raise OSError(errno.EINVAL, "Invalid argument", str(path))
                fd = real_open(path, flags, *args, **kwargs)
                self.direct_fds.add(fd)
                return fd
            return real_open(path, flags, *args, **kwargs)

        real_close = os.close

        def fake_close(fd: int) -> None:
            self.direct_fds.discard(fd)  # the number is reused by the next open
            real_close(fd)

        monkeypatch.setattr(os, "open", fake_open)
        monkeypatch.setattr(os, "close", fake_close)
        for name in ("pread", "preadv", "read", "readv", "readinto"):
            real = getattr(os, name, None)
            if real is None:
                continue

            def failing(fd, *args, _real=real, **kwargs):  # type: ignore[no-untyped-def]
                if fd in self.direct_fds:
                    raise OSError(errno.EINVAL, "Invalid argument")
                return _real(fd, *args, **kwargs)

            monkeypatch.setattr(os, name, failing)

        # The C loop (engine/native.py) reads with its own pread: where a read of one of these
        # descriptors would be refused, it is refused there too, before any read (as its first read's
        # EINVAL does), and the load goes on with the Python loop.
        from flashtensors.engine import native

        real_native = native.read_regions

        def refusing(regions, fds, *args, **kwargs):  # type: ignore[no-untyped-def]
            if any(fd in self.direct_fds for fd in fds):
                raise native.DirectRefused(str(regions[0].path))
            return real_native(regions, fds, *args, **kwargs)

        monkeypatch.setattr(native, "read_regions", refusing)
