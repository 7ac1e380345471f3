"""What `flash bench run` is given: the checkpoint under test (its files, headers and reference digests)
and the options that say what to measure and how, checked before anything runs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from flashtensors.bench.cache import CACHE_DROP_METHODS
from flashtensors.bench.checksum import pick_names, reference_digests
from flashtensors.bench.launcher import START_METHODS
from flashtensors.bench.loaders import LOADERS
from flashtensors.errors import ConfigError
from flashtensors.format.safetensors import FileHeader, read_header

SCENARIOS = ("cold", "warm", "hot", "e2e")
WARM_FILLS = ("keep", "fresh")  # warm and hot: keep resident pages as found, or evict and re-read them
# hot on a GPU: the timed load gets device memory fresh from the driver (torch's cache emptied after the
# untimed load) or reuses the untimed load's memory from torch's cache, as a process swapping models does
HOT_MEMORY = ("fresh", "reused")
GiB = 1024**3


@dataclass(frozen=True)
class BenchCheckpoint:
    """The checkpoint under test: its folder, files, headers, size and reference digests."""

    directory: Path
    files: tuple[Path, ...]
    headers: tuple[FileHeader, ...]
    nbytes: int
    names: tuple[str, ...]
    reference: dict[str, str]

    @property
    def tensors(self) -> int:
        return sum(len(h.tensors) for h in self.headers)


@dataclass
class RunOptions:
    """What `flash bench run` measures and how."""

    loaders: list[str] = field(default_factory=lambda: ["flashtensors", "safetensors", "safetensors-mmap"])
    scenarios: list[str] = field(default_factory=lambda: ["cold", "warm", "hot"])
    repeat: int = 3
    device: str = "cuda"
    cache_drop: str = "auto"
    warm_fill: str = "keep"
    hot_memory: str = "fresh"
    limits: bool = True
    limit_bytes: int = 8 * GiB
    h2d_bytes: int = 2 * GiB
    memcpy_bytes: int = GiB
    timeout: float = 1800.0
    start: str = "forkserver"

    def validate(self) -> RunOptions:
        hint = "run `flash bench run --help`"
        bad = [name for name in self.loaders if name not in LOADERS]
        if bad:
            raise ConfigError(f"unknown loader(s) {', '.join(bad)}; known: {', '.join(LOADERS)}", hint=hint)
        bad = [s for s in self.scenarios if s not in SCENARIOS]
        if bad:
            known = ", ".join(SCENARIOS)
            raise ConfigError(f"unknown scenario(s) {', '.join(bad)}; known: {known}", hint=hint)
        if not self.loaders or not self.scenarios:
            raise ConfigError("name at least one loader and one scenario", hint=hint)
        if self.repeat < 1:
            raise ConfigError(f"--repeat must be at least 1, not {self.repeat}")
        for flag, value, allowed in (
            ("--cache-drop", self.cache_drop, CACHE_DROP_METHODS),
            ("--warm-fill", self.warm_fill, WARM_FILLS),
            ("--hot-memory", self.hot_memory, HOT_MEMORY),
            ("--start", self.start, START_METHODS),
        ):
            if value not in allowed:
                raise ConfigError(f"{flag} must be one of {', '.join(allowed)}, not {value!r}", hint=hint)
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"--device must be cpu, cuda or cuda:N, not {self.device!r}")
        if self.timeout <= 0:
            raise ConfigError(f"--timeout must be positive, not {self.timeout:g}", hint=hint)
        return self


def resolve_checkpoint(dir_or_model: str | os.PathLike[str]) -> BenchCheckpoint:
    """Find the safetensors files of a folder, a file or a model id of the local store, and hash the
    tensors every run is checked against.

    Raises:
        ModelNotFound: nothing usable at that path or id.
        FormatError: a file is not valid safetensors.
    """
    from flashtensors.engine.plan import resolve_files

    files = tuple(Path(f) for f in resolve_files(dir_or_model))
    directory = Path(dir_or_model) if Path(dir_or_model).is_dir() else files[0].parent
    headers = tuple(read_header(f) for f in files)
    names = pick_names(headers)
    return BenchCheckpoint(
        directory=directory,
        files=files,
        headers=headers,
        nbytes=sum(h.data_size for h in headers),
        names=tuple(names),
        reference=reference_digests(headers, names),
    )
