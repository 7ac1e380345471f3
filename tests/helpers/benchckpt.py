"""Tiny synthetic checkpoints for the bench tests, made by `flash bench make`'s own code."""

from __future__ import annotations

from pathlib import Path

import pytest

from flashtensors.bench.make import make_checkpoint
from flashtensors.bench.shapes import resolve_shape

TINY = {
    "layers": 2,
    "hidden": 64,
    "intermediate": 128,
    "heads": 4,
    "kv_heads": 2,
    "head_dim": 16,
    "vocab": 512,
}


def make_tiny(factory: pytest.TempPathFactory, name: str, seed: int, **overrides: int) -> Path:
    """A custom-shape checkpoint split into several shards (a 16 KiB shard size splits it)."""
    path = factory.mktemp(name) / "tiny"
    make_checkpoint(resolve_shape("custom", **{**TINY, **overrides}), path, shard_size=16 * 1024, seed=seed)
    return path
