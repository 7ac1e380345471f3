"""Plan a load: which files, where each file's bytes go in the model's one arena, where each tensor lives.

The arena is one uint8 buffer per device per model. Each file gets a region that mirrors the file from
``align_down(data_start, 4096)`` to ``align_up(file_size, 4096)``, so every read path copies contiguous
file extents into contiguous arena extents. On a CPU the region starts on a 4096 boundary (O_DIRECT reads
of aligned supersets go straight into it) and a tensor keeps the alignment it has in the file (HF
checkpoints: 8 bytes or more). On a GPU the region is shifted so the file's tensors start on 256-byte
boundaries, as each would in its own allocation (:data:`GPU_TENSOR_ALIGN`).

A tensor whose offset is not a multiple of its item size (legal in safetensors, but torch cannot view it)
is copied after the read into a relocation area at the end of the arena, at an aligned offset.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from flashtensors.engine.sysio import DIRECT_ALIGN, align_down, align_up
from flashtensors.errors import FormatError, ModelNotFound
from flashtensors.format.safetensors import FileHeader, TensorInfo, read_header
from flashtensors.lru import LRU

RELOC_ALIGN = 256
INDEX_NAME = "model.safetensors.index.json"

Checkpoint = str | os.PathLike[str] | list[str | os.PathLike[str]]


@dataclass(frozen=True)
class Placement:
    """Where one tensor ends up: ``offset`` in the arena (after relocation, if any)."""

    info: TensorInfo
    offset: int
    source: int  # where its bytes land when the file region is read; == offset unless relocated


@dataclass(frozen=True)
class FileRegion:
    """One file's bytes in the arena: file [file_start, file_end) -> arena [arena_offset, ...)."""

    header: FileHeader
    file_start: int  # aligned down to DIRECT_ALIGN
    file_end: int  # == header.file_size
    arena_offset: int  # DIRECT_ALIGN-aligned
    span: int  # bytes reserved: align_up(file_end) - file_start

    @property
    def path(self) -> Path:
        return self.header.path

    @property
    def nbytes(self) -> int:
        return self.file_end - self.file_start


@dataclass(frozen=True)
class Plan:
    regions: tuple[FileRegion, ...]
    placements: tuple[Placement, ...]  # in checkpoint order (files in order, tensors in file order)
    arena_size: int

    @property
    def tensor_bytes(self) -> int:
        return sum(p.info.nbytes for p in self.placements)

    @property
    def file_bytes(self) -> int:
        return sum(r.header.file_size for r in self.regions)


def _index_files(index_path: Path) -> list[Path]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))  # keep first-seen order, drop repeats
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FormatError(f"{index_path}: not a valid safetensors index ({exc})") from exc
    for n in names:
        # Shards live beside their index: a name that climbs out of the folder is refused, not followed.
        if not isinstance(n, str) or Path(n).is_absolute() or ".." in Path(n).parts:
            raise FormatError(f"{index_path}: shard name {n!r} points outside the checkpoint folder")
    files = [index_path.parent / n for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelNotFound(
            f"{index_path.parent}: shard(s) named in {index_path.name} are missing: {', '.join(missing)}",
            hint="the checkpoint is incomplete: pull it again (`flash pull MODEL --force`)",
        )
    return files


def resolve_files(checkpoint: Checkpoint) -> list[Path]:
    """The safetensors files of a checkpoint: a file, a folder (index json or every shard), a list, or a
    model id of the local store.

    Raises:
        ModelNotFound: nothing usable at that path or id.
        FormatError: an index json that cannot be read.
    """
    if isinstance(checkpoint, (list, tuple)):
        files = [Path(f) for f in checkpoint]
        for f in files:
            if not f.is_file():
                raise ModelNotFound(f"no such file: {f}", hint="check the path")
        return files
    path = Path(checkpoint)
    if not path.exists():
        # Not a path: a model id of the local store (the store raises ModelNotFound with a pull hint).
        from flashtensors.store import resolve_model_path

        path = resolve_model_path(str(checkpoint))
    if path.is_file():
        return [path]
    if path.is_dir():
        index = path / INDEX_NAME
        if index.is_file():
            return _index_files(index)
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
        raise ModelNotFound(
            f"{path}: no *.safetensors files in this folder",
            hint="point at a folder that holds safetensors weights, or `flash pull MODEL` first",
        )
    raise ModelNotFound(f"not a file or folder: {path}", hint="check the path")


_plans: LRU[tuple[int, ...], tuple[tuple[FileHeader, ...], Plan]] = LRU(64)

# cuBLAS, through torch, picks its matmul kernels by how the operands' addresses are aligned, up to
# 256 bytes. A GPU tensor that sits only 64-aligned can get another kernel than the same tensor in its
# own allocation (as transformers makes it): measured on the H100 machine, a Qwen3-8B shape's logits then
# differed from transformers' (sum 752.19 against 748.37) with the very same weights.
GPU_TENSOR_ALIGN = 256


def make_plan(files: list[Path], device_align: int = 0) -> Plan:
    """Read and validate every header (before any data byte is read) and lay out the arena.

    The layout of headers seen before is reused: :func:`read_header` returns the very same header
    object for a file that has not changed, so a plan whose headers are all identical (``is``) to the
    ones it was made from is still exact. Laying out 300 tensors costs ~0.5 ms, 2% of a hot 0.6B load.

    With ``device_align`` (for an arena on a GPU, :data:`GPU_TENSOR_ALIGN`), each file's region is
    shifted so that its first tensor, and with it every tensor whose offset from the first is a multiple
    of ``device_align`` (in HF checkpoints, all of them), lands on such a boundary. Regions then no longer
    start on 4096 boundaries, which only reads straight into a CPU arena (O_DIRECT) need.
    """
    headers = tuple(read_header(f) for f in files)
    key = (device_align, *(id(h) for h in headers))
    hit = _plans.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], headers, strict=True)):
        return hit[1]
    plan = _layout(headers, device_align)
    _plans.put(key, (headers, plan))  # holding the headers keeps their ids from being reused
    return plan


def _layout(headers: tuple[FileHeader, ...], device_align: int) -> Plan:
    seen: dict[str, Path] = {}
    regions: list[FileRegion] = []
    placements: list[Placement] = []
    cursor = 0
    relocate: list[tuple[TensorInfo, int]] = []
    for header in headers:
        file_start = align_down(header.data_start, DIRECT_ALIGN)
        span = align_up(header.file_size, DIRECT_ALIGN) - file_start
        if device_align:  # shift the region so the file's first tensor starts on a device_align boundary
            head = header.data_start - file_start
            cursor = align_up(cursor + head, device_align) - head
        region = FileRegion(header, file_start, header.file_size, cursor, span)
        regions.append(region)
        for t in header.tensors:
            if t.name in seen:
                raise FormatError(
                    f"tensor {t.name!r} is in both {seen[t.name]} and {header.path}",
                    hint="the checkpoint mixes shards of different models: pull it again",
                )
            seen[t.name] = header.path
            source = cursor + (t.start - file_start)
            if t.nbytes and source % t.itemsize:
                relocate.append((t, source))
            else:
                placements.append(Placement(t, source, source))
        cursor += span
    # Relocated tensors go after every file region, each on a RELOC_ALIGN boundary.
    cursor = align_up(cursor, RELOC_ALIGN)
    for t, source in relocate:
        placements.append(Placement(t, cursor, source))
        cursor = align_up(cursor + t.nbytes, RELOC_ALIGN)
    order = {name: i for i, name in enumerate(seen)}
    placements.sort(key=lambda p: order[p.info.name])
    return Plan(tuple(regions), tuple(placements), max(cursor, 1))
