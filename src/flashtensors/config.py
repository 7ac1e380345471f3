"""One Settings object; every environment variable is declared here, once.

Precedence: ``ft.configure(...)`` > environment variable > default. ``flash --help`` and the docs render
the table in :data:`VARIABLES`, so a variable's description lives in exactly one place.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from flashtensors.errors import ConfigError

MiB = 1024**2
GiB = 1024**3

READ_PATHS = ("auto", "direct", "pinned-mmap", "buffered")


def _parse_size(text: str) -> int:
    """Parse ``30G``, ``512MiB``, ``1073741824`` into bytes."""
    s = text.strip().lower().replace("ib", "").replace("b", "")
    mult = 1
    for suffix, m in (("k", 1024), ("m", MiB), ("g", GiB), ("t", 1024 * GiB)):
        if s.endswith(suffix):
            s, mult = s[:-1], m
            break
    try:
        value = float(s) * mult
    except ValueError as exc:
        raise ConfigError(f"not a size: {text!r} (examples: 512M, 30G, 1073741824)") from exc
    if value < 0:
        raise ConfigError(f"size must not be negative: {text!r}")
    return int(value)


def _size_text(nbytes: int) -> str:
    """A size the way the variables take it: ``16M``, ``1G``, ``6000`` (exact, so it can be pasted)."""
    for suffix, mult in (("G", GiB), ("M", MiB), ("K", 1024)):
        if nbytes and nbytes % mult == 0:
            return f"{nbytes // mult}{suffix}"
    return str(nbytes)


def _parse_bool(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def _parse_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise ConfigError(f"not a number: {text!r}") from exc
    return value


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError as exc:
        raise ConfigError(f"not an integer: {text!r}") from exc


def _auto_or(parse: Callable[[str], int]) -> Callable[[str], int]:
    """``parse``, with ``auto`` read as 0 (the engine then picks the value per load)."""

    def run(text: str) -> int:
        if text.strip().lower() == "auto":
            return 0
        try:
            return parse(text)
        except ConfigError as exc:
            raise ConfigError(f"{exc.message}, or auto") from exc

    return run


@dataclass(frozen=True)
class Variable:
    """An environment variable: its name, the Settings field it fills, parser and description."""

    env: str
    field: str
    parse: Callable[[str], Any]
    description: str


VARIABLES: tuple[Variable, ...] = (
    Variable("FLASH_HOME", "storage_path", Path, "where the local model store lives"),
    Variable("FLASH_HOST", "host", str, "address of the daemon, host:port"),
    Variable(
        "FLASH_MEM_POOL_SIZE",
        "mem_pool_size",
        _parse_size,
        "bytes of pinned host RAM the RAM tier may hold (e.g. 30G)",
    ),
    Variable(
        "FLASH_GPU_MEMORY_UTILIZATION",
        "gpu_memory_utilization",
        _parse_fraction,
        "fraction of GPU memory the GPU tier and backends may use",
    ),
    Variable(
        "FLASH_READ_PATH",
        "read_path",
        str,
        "force a read path: auto, direct (O_DIRECT ring), pinned-mmap, buffered",
    ),
    Variable("FLASH_IO_THREADS", "io_threads", _parse_int, "threads issuing O_DIRECT reads (cold path)"),
    Variable(
        "FLASH_CPU_THREADS",
        "cpu_threads",
        _parse_int,
        "threads for buffered reads and host memcpy (warm and CPU paths)",
    ),
    Variable(
        "FLASH_CHUNK_SIZE",
        "chunk_size",
        _parse_size,
        "bytes per staging slot and per read job (O_DIRECT reads with read_size auto: slots of at most 512K)",
    ),
    Variable(
        "FLASH_READ_SIZE",
        "read_size",
        _auto_or(_parse_size),
        "bytes per read request; the readers fill a chunk together, its requests taken in file order "
        "(auto: 512K slots for O_DIRECT reads to a GPU, one request each, else a whole chunk per request; "
        "set it to chunk_size for whole chunks everywhere)",
    ),
    Variable(
        "FLASH_RING_SIZE",
        "ring_size",
        _auto_or(_parse_size),
        "pinned staging ring bytes, per slot size in use (at most 1G); auto: 1.5 slots per O_DIRECT reader "
        "with read_size auto, else 2 per cold reader, 4 from 4 GiB of cold reads",
    ),
    Variable(
        "FLASH_REGISTER_CHUNK",
        "register_chunk",
        _parse_size,
        "most bytes pinned per cudaHostRegister call on the warm path",
    ),
    Variable(
        "FLASH_WARM_RING_THREADS",
        "warm_ring_threads",
        _parse_int,
        "threads reading a warm file's tail through the staging ring while its head is pinned (0: pin only)",
    ),
    Variable(
        "FLASH_RESIDENT_FRACTION",
        "resident_fraction",
        _parse_fraction,
        "share of a file that must be in the page cache for the warm path",
    ),
    Variable(
        "FLASH_NATIVE_READS",
        "native_reads",
        _parse_bool,
        "cold O_DIRECT reads by a C loop, built by the install or on first use (0: the Python loop)",
    ),
    Variable("FLASH_DEBUG", "debug", _parse_bool, "show tracebacks"),
)


@dataclass(frozen=True)
class Settings:
    """Every tunable of flashtensors. Obtain with :func:`get_settings`, change with :func:`configure`."""

    storage_path: Path = Path.home() / ".cache" / "flashtensors"
    host: str = "127.0.0.1:8073"
    mem_pool_size: int = 8 * GiB
    gpu_memory_utilization: float = 0.9
    read_path: str = "auto"
    io_threads: int = 16
    cpu_threads: int = 8
    chunk_size: int = 16 * MiB
    read_size: int = 0  # 0 (auto): O_DIRECT ring reads whole 512 KiB slots; others a chunk each
    ring_size: int = 0  # 0: sized by the cold readers and bytes, grown as needed (engine.staging.ring_slots)
    register_chunk: int = 1 * GiB
    warm_ring_threads: int = 8
    resident_fraction: float = 0.9
    native_reads: bool = True
    debug: bool = False

    def validate(self) -> Settings:
        if self.read_path not in READ_PATHS:
            raise ConfigError(f"read_path must be one of {', '.join(READ_PATHS)}, not {self.read_path!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], not {self.gpu_memory_utilization}")
        if not 0.0 <= self.resident_fraction <= 1.0:
            raise ConfigError(f"resident_fraction must be in [0, 1], not {self.resident_fraction}")
        if self.mem_pool_size < 0:
            raise ConfigError("mem_pool_size must not be negative")
        for name in ("io_threads", "cpu_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.warm_ring_threads < 0:
            raise ConfigError("warm_ring_threads must be 0 (pin only) or more")
        if self.chunk_size < 4096 or self.chunk_size % 4096:
            raise ConfigError(
                f"chunk_size must be a positive multiple of 4096, not {_size_text(self.chunk_size)}"
            )
        if self.read_size % 4096 or self.read_size > self.chunk_size:
            raise ConfigError(
                "read_size must be auto or a multiple of 4096 no larger than chunk_size "
                f"(got {_size_text(self.read_size)}, chunk_size {_size_text(self.chunk_size)})"
            )
        if not 2 * self.chunk_size <= (self.ring_size or 2 * self.chunk_size) <= GiB:
            chunk = _size_text(self.chunk_size)
            if not self.ring_size:
                raise ConfigError(
                    f"ring_size auto needs two chunks in at most 1G, and chunk_size is {chunk}: "
                    "lower chunk_size to 512M or less"
                )
            raise ConfigError(
                f"ring_size must hold two chunks and be at most 1G (got {_size_text(self.ring_size)} with "
                f"chunk_size {chunk}): set ring_size between {_size_text(2 * self.chunk_size)} and 1G, or "
                "lower chunk_size"
            )
        if self.register_chunk < MiB or self.register_chunk % 4096:
            raise ConfigError("register_chunk must be a multiple of 4096 and at least 1 MiB")
        return self


def _from_env() -> Settings:
    values: dict[str, Any] = {}
    for var in VARIABLES:
        raw = os.environ.get(var.env)
        if raw is not None and raw != "":
            try:
                values[var.field] = var.parse(raw)
            except ConfigError as exc:
                raise ConfigError(f"{var.env}: {exc.message}") from exc
    if "cpu_threads" not in values:
        values["cpu_threads"] = max(1, min(16, os.cpu_count() or 1))
    try:
        return Settings(**values).validate()
    except ConfigError as exc:  # name the variable the user set, not our field
        for var in VARIABLES:
            if var.env in os.environ and re.search(rf"\b{var.field}\b", exc.message):
                raise ConfigError(f"{var.env}={os.environ[var.env]}: {exc.message}") from exc
        raise


_lock = threading.Lock()
_settings: Settings | None = None


def get_settings() -> Settings:
    """The settings in force: defaults, overridden by FLASH_* variables, overridden by configure()."""
    global _settings
    with _lock:
        if _settings is None:
            _settings = _from_env()
        return _settings


def configure(**kwargs: Any) -> Settings:
    """Change settings for this process.

    Args:
        storage_path: where the model store lives (``FLASH_HOME``).
        mem_pool_size: bytes of pinned RAM the RAM tier may hold.
        gpu_memory_utilization: fraction of GPU memory flashtensors and backends may use.
        **kwargs: any other :class:`Settings` field (read_path, io_threads, cpu_threads, chunk_size, ...).

    Returns:
        The new settings.

    Raises:
        ConfigError: an unknown name or a value out of range.

    Example:
        >>> import flashtensors as ft
        >>> ft.configure(storage_path="/tmp/models", mem_pool_size=30 * 1024**3)  # doctest: +SKIP
    """
    global _settings
    names = {f.name for f in fields(Settings)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    if "storage_path" in kwargs and kwargs["storage_path"] is not None:
        kwargs["storage_path"] = Path(kwargs["storage_path"]).expanduser()
    current = get_settings()
    new = replace(current, **{k: v for k, v in kwargs.items() if v is not None}).validate()
    with _lock:
        _settings = new
    return new


def reset_settings() -> None:
    """Forget configure() calls and re-read the environment at next use (tests use this)."""
    global _settings
    with _lock:
        _settings = None
