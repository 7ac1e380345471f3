"""Build a model folder in ``.tmp`` and swap it into ``models/`` in one step; clean up after killed pulls.

Order of a pull, and what a SIGKILL at each point leaves:

1. files are copied / linked / converted into ``.tmp/<key>@build-<id>/`` -> only ``.tmp`` garbage;
2. ``flash-manifest.json`` is written there last, every file is fsynced -> still only ``.tmp`` garbage;
3. the folder replaces ``models/<org>/<name>`` with one ``renameat2(RENAME_EXCHANGE)`` (or, where that
   is missing, old -> ``.tmp/<key>@old-<id>`` then new -> place) -> the old model or the new one;
4. the old folder is deleted.

The next pull (or rm) cleans ``.tmp`` entries whose model nobody holds locked, and puts an ``@old-``
folder back if a pull died between the two renames of the fallback path.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flashtensors.errors import StoreError
from flashtensors.store import fsutil
from flashtensors.store.convert import convert_pickle, safetensors_name, write_index
from flashtensors.store.hashing import copy_and_hash, hash_file
from flashtensors.store.layout import DOWNLOAD_SUFFIX, MANIFEST_NAME, ModelRef, StoreLayout, ref_from_key
from flashtensors.store.locks import try_model_lock
from flashtensors.store.manifest import FileEntry, build_manifest, write_manifest
from flashtensors.store.progress import Progress, human_size

# Tests set this to stop a pull at a named point (and kill it there); None in normal use.
stage_hook: Callable[[str], None] | None = None


def stage(point: str) -> None:
    """Mark a point of a pull (and stop there if a test asks to).

    Points: ``build-created``, ``chunk-copied``, ``file-stored``, ``manifest-written``, ``moved-aside``
    (fallback swap only), ``swapped``.
    """
    if stage_hook is not None:
        stage_hook(point)


def disk_full(layout: StoreLayout, ref: ModelRef, need: int) -> StoreError:
    """The error for ENOSPC: how much is missing, and where."""
    free = fsutil.free_bytes(layout.root)
    short = max(need - free, 0)
    gb = max(short / 1e9, 0.1)
    return StoreError(
        f"disk full: storing {ref.id} needs {human_size(need)} in {layout.root}, "
        f"{human_size(free)} free; free {gb:.1f} GB",
        hint=f"free {gb:.1f} GB on that disk, or set FLASH_HOME to a larger one, then run `flash pull` again",
    )


class Build:
    """A model folder under construction; nothing in it is visible to readers until :meth:`install`."""

    def __init__(self, layout: StoreLayout, ref: ModelRef, progress: Progress) -> None:
        self.layout = layout
        self.ref = ref
        self.progress = progress
        self.path = layout.tmp / f"{ref.key}@build-{uuid.uuid4().hex[:12]}"
        self.path.mkdir(parents=True)
        self.files: list[FileEntry] = []
        self.converted: list[str] = []
        stage("build-created")

    def _advance(self, name: str) -> Callable[[int], None]:
        return lambda n: self.progress.advance(name, n)

    def copy(self, src: Path, name: str) -> None:
        """Copy one file in, hashing it on the way."""
        self.progress.start_file(name, src.stat().st_size, verb="copied")
        size, digest = copy_and_hash(
            src, self.path / name, advance=self._advance(name), on_chunk=lambda: stage("chunk-copied")
        )
        self.progress.end_file(name)
        self.files.append(FileEntry(name, size, digest))
        stage("file-stored")

    def link(self, src: Path, name: str) -> None:
        """Hard-link one file in (HF cache blobs, finished downloads); copy when links are impossible."""
        if not fsutil.try_link(src, self.path / name):
            self.copy(Path(os.path.realpath(src)), name)
            return
        self.progress.start_file(name, (self.path / name).stat().st_size, verb="hashed")
        size, digest = hash_file(self.path / name, advance=self._advance(name))
        self.progress.end_file(name)
        self.files.append(FileEntry(name, size, digest))
        stage("file-stored")

    def convert(self, src: Path, name: str) -> None:
        """Convert a pickled state dict to safetensors under its safetensors name."""
        target = safetensors_name(name)
        self.progress.message(f"converting {name} -> {target} (weights_only=True)")
        convert_pickle(src, self.path / target)
        self.progress.start_file(target, (self.path / target).stat().st_size, verb="converted")
        size, digest = hash_file(self.path / target, advance=self._advance(target))
        self.progress.end_file(target)
        self.files.append(FileEntry(target, size, digest, converted_from=name))
        self.converted.append(target)
        stage("file-stored")

    def finish(self, source: dict[str, Any]) -> dict[str, Any]:
        """Write the index of converted shards and the manifest (last), and make everything durable."""
        if len(self.converted) > 1 and not (self.path / "model.safetensors.index.json").exists():
            index = write_index(self.path, sorted(self.converted))
            size, digest = hash_file(index)
            self.files.append(FileEntry(index.name, size, digest))
        manifest = build_manifest(self.path, name=self.ref.id, source=source, files=self.files)
        fsutil.fsync_tree(self.path)
        write_manifest(self.path, manifest)
        stage("manifest-written")
        return manifest

    def install(self) -> None:
        """Put the finished folder in place of the model's folder, atomically, and delete the old one."""
        final = self.layout.model_dir(self.ref)
        final.parent.mkdir(parents=True, exist_ok=True)
        if not final.exists():
            os.rename(self.path, final)
            fsutil.fsync_path(final.parent)
            stage("swapped")
            return
        if fsutil.exchange(self.path, final):
            fsutil.fsync_path(final.parent)
            stage("swapped")
            fsutil.remove_tree(self.path)  # holds the old version now
            return
        old = self.layout.tmp / f"{self.ref.key}@old-{uuid.uuid4().hex[:12]}"
        os.rename(final, old)
        stage("moved-aside")
        os.rename(self.path, final)
        fsutil.fsync_path(final.parent)
        stage("swapped")
        fsutil.remove_tree(old)

    def discard(self) -> None:
        fsutil.remove_tree(self.path)


def _settle(layout: StoreLayout, ref: ModelRef, entry: Path, suffix: str) -> None:
    if suffix.startswith("old-") and not layout.is_present(ref) and (entry / MANIFEST_NAME).is_file():
        layout.model_dir(ref).parent.mkdir(parents=True, exist_ok=True)
        os.rename(entry, layout.model_dir(ref))  # a pull died between its two renames: keep the old model
    else:
        fsutil.remove_tree(entry)


def clean_stale(layout: StoreLayout, holding: ModelRef | None = None) -> None:
    """Remove ``.tmp`` leftovers of killed pulls; entries of models locked by live pulls are left alone.

    Args:
        layout: the store.
        holding: a model whose lock the caller already holds (its leftovers are stale by definition).
    """
    if not layout.tmp.is_dir():
        return
    for entry in sorted(layout.tmp.iterdir()):
        key, sep, suffix = entry.name.partition("@")
        ref = ref_from_key(key)
        if ref is None or not sep or suffix == DOWNLOAD_SUFFIX:
            continue  # not ours, or finished downloads kept so the next pull need not fetch them again
        if holding is not None and ref.key == holding.key:
            _settle(layout, ref, entry, suffix)
            continue
        fd = try_model_lock(layout, ref)
        if fd is None:
            continue  # a live pull of that model owns it
        try:
            if entry.exists():
                _settle(layout, ref, entry, suffix)
        finally:
            os.close(fd)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
