"""Write synthetic HF-style checkpoints with real Qwen3 shapes, as fast as the disk takes them.

Values come from one pool of random, finite, small bf16 (or fp16/fp32) numbers, generated once; each
tensor is a slice of that pool starting at its own random offset. Writing is therefore a stream of large
``write`` calls from one buffer: no 65 GB tensor in memory, no per-byte generation cost, and every tensor
still holds different bytes (so a loader that returns the wrong tensor fails the checksum).

Every file is written under a temporary name, fsynced and renamed; the index and configs are written
last, so a reader never sees a checkpoint that looks complete but is not.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashtensors.bench.shapes import DTYPES, SPECIAL_IDS, Shape
from flashtensors.errors import ConfigError, StoreError

POOL_BYTES = 64 * 1024**2  # distinct random bytes; tensors are windows into it
WRITE_BYTES = 16 * 1024**2  # one write() call
TOKENIZER_VOCAB = 2048  # the demo tokenizer's size; a larger model vocabulary just leaves ids unused
MIN_VOCAB = 3 + 256  # the tokenizer's specials and byte symbols must fit in the embedding


@dataclass(frozen=True)
class MadeCheckpoint:
    """What :func:`make_checkpoint` wrote."""

    path: Path
    shape: Shape
    dtype: str
    files: tuple[Path, ...]
    nbytes: int  # tensor bytes, headers excluded
    tensors: int
    write_seconds: float  # writing and fsyncing the shards (not the tokenizer or configs)


def _signed(value: int, bits: int) -> int:
    """A bit pattern as the signed integer torch wants for a bitwise op on intN."""
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


# Per dtype: (integer bits, bits kept from the random word, bits forced on). Kept: the sign, the mantissa and
# the two lowest exponent bits; forced: the rest of the exponent, so every value is finite, normal and of
# magnitude 2^-7 .. 2^-3 (fp16: 2^-7 .. 2^-5), like trained weights and unlike raw random bits (NaN, Inf).
_MASKS: dict[str, tuple[int, int, int]] = {
    "bf16": (16, 0x81FF, 0x3C00),
    "fp16": (16, 0x87FF, 0x2000),
    "fp32": (32, 0x81FFFFFF, 0x3C000000),
}


def _pool(dtype: str, seed: int) -> memoryview:
    """POOL_BYTES (+ one write of slack) of random finite values."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    words = torch.empty((POOL_BYTES + WRITE_BYTES) // 8, dtype=torch.int64).random_(
        -(2**63), 2**63 - 1, generator=gen
    )
    bits, keep, force = _MASKS[dtype]
    view = words.view(torch.int16 if bits == 16 else torch.int32)
    view.bitwise_and_(_signed(keep, bits)).bitwise_or_(_signed(force, bits))
    return words.numpy().data.cast("B")


def _nbytes(dims: tuple[int, ...], itemsize: int) -> int:
    n = itemsize
    for d in dims:
        n *= d
    return n


def _header(entries: list[tuple[str, tuple[int, ...]]], st_dtype: str, itemsize: int) -> tuple[bytes, int]:
    """The safetensors header (length prefix included, padded to 8 bytes) and the data size."""
    obj: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in entries:
        n = _nbytes(dims, itemsize)
        obj[name] = {"dtype": st_dtype, "shape": list(dims), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(obj, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offset


def _write_tensor(f: Any, pool: memoryview, nbytes: int, rng: random.Random, itemsize: int) -> None:
    written = 0
    while written < nbytes:
        n = min(WRITE_BYTES, nbytes - written)
        start = rng.randrange(0, POOL_BYTES // itemsize) * itemsize
        f.write(pool[start : start + n])
        written += n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _shards(shape: Shape, itemsize: int, shard_size: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Group tensors into shards the way HF does: close a shard before it would exceed shard_size."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in shape.tensors():
        n = _nbytes(dims, itemsize)
        if shards[-1] and size + n > shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += n
    return shards


def _write_tokenizer(directory: Path, vocab: int) -> None:
    """The demo model's byte-level BPE tokenizer (any text encodes, nothing to fetch), written atomically."""
    import tempfile

    from flashtensors.demo import build_tokenizer

    tokenizer = build_tokenizer(min(vocab, TOKENIZER_VOCAB))
    with tempfile.TemporaryDirectory(dir=directory, prefix=".tokenizer-") as tmp:
        for written in tokenizer.save_pretrained(tmp):
            src = Path(written)
            with open(src, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(src, directory / src.name)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with open(directory / ".flash-bench.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                f"{directory} is being written by another `flash bench make`",
                hint="wait for it to finish, or choose another directory",
            ) from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _check_target(directory: Path, force: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise StoreError(f"{directory} exists and is not a directory", hint="choose another directory")
    leftovers = (
        [p for p in directory.iterdir() if p.name != ".flash-bench.lock"] if directory.exists() else []
    )
    if leftovers and not force:
        raise StoreError(
            f"{directory} is not empty ({len(leftovers)} entries)",
            hint=f"choose an empty directory, or overwrite with `flash bench make ... {directory} --force`",
        )
    for p in leftovers:
        if p.is_file() and (p.suffix in (".safetensors", ".json", ".tmp") or p.name.startswith(".model-")):
            p.unlink()


def make_checkpoint(
    shape: Shape,
    directory: str | Path,
    *,
    shard_size: int = 4 * 1024**3,
    dtype: str = "bf16",
    seed: int = 0,
    force: bool = False,
    progress: bool = False,
) -> MadeCheckpoint:
    """Write a synthetic HF-style ``Qwen3ForCausalLM`` checkpoint.

    Args:
        shape: the model's dimensions (see :func:`flashtensors.bench.shapes.resolve_shape`).
        directory: where to write; created if missing, must be empty unless ``force``.
        shard_size: close a shard before it would exceed this many bytes (one tensor larger than that gets a
            shard of its own).
        dtype: ``bf16``, ``fp16`` or ``fp32``.
        seed: the same seed writes the same bytes.
        force: overwrite checkpoint files already in ``directory``.
        progress: print one line per shard on stderr.

    Returns:
        A :class:`MadeCheckpoint` describing the files.

    Raises:
        ConfigError: unknown dtype, vocabulary too small for the tokenizer, or a shard size below 1 KiB.
        StoreError: the directory is not empty, or another writer holds it.

    Example:
        >>> from flashtensors.bench.shapes import resolve_shape
        >>> make_checkpoint(resolve_shape("custom"), "/tmp/tiny", force=True).tensors  # doctest: +SKIP
        25
    """
    hint = "see `flash bench make --help`"
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}", hint=hint)
    if shape.vocab < MIN_VOCAB:
        raise ConfigError(
            f"vocab must be at least {MIN_VOCAB} (the byte-level tokenizer), not {shape.vocab}", hint=hint
        )
    if shard_size < 1024:
        raise ConfigError(f"shard size must be at least 1 KiB, not {shard_size}", hint=hint)
    st_dtype, itemsize, _ = DTYPES[dtype]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory):
        _check_target(directory, force)
        pool = _pool(dtype, seed)
        rng = random.Random(seed)
        shards = _shards(shape, itemsize, shard_size)
        count = len(shards)
        started = time.perf_counter()
        weight_map: dict[str, str] = {}
        files: list[Path] = []
        total = 0
        for i, entries in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{count:05d}.safetensors"
            final = directory / name
            tmp = directory / f".{name}.tmp"
            header, size = _header(entries, st_dtype, itemsize)
            with open(tmp, "wb") as f:  # buffered: write() loops until every byte is out
                f.write(header)
                for tname, dims in entries:
                    _write_tensor(f, pool, _nbytes(dims, itemsize), rng, itemsize)
                    weight_map[tname] = name
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            files.append(final)
            total += size
            if progress:
                print(f"  wrote {name} ({size / 1e9:.2f} GB, {len(entries)} tensors)", file=sys.stderr)
        write_seconds = time.perf_counter() - started
        _write_tokenizer(directory, shape.vocab)
        _atomic_json(directory / "generation_config.json", {**SPECIAL_IDS, "do_sample": False})
        _atomic_json(directory / "config.json", shape.config(dtype))
        # The index last: its presence is what marks the checkpoint complete.
        _atomic_json(
            directory / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )
        _fsync_dir(directory)
    (directory / ".flash-bench.lock").unlink(missing_ok=True)
    return MadeCheckpoint(directory, shape, dtype, tuple(files), total, len(weight_map), write_seconds)
