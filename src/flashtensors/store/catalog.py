"""Reading and managing what the store holds: resolve, list, show, remove, verify."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from flashtensors.errors import ConfigError, IntegrityError, ModelNotFound, StoreError
from flashtensors.store import fsutil
from flashtensors.store.build import clean_stale
from flashtensors.store.hashing import HASH_ALGORITHM, hash_file
from flashtensors.store.layout import DEFAULT_ORG, ModelRef, StoreLayout, parse_model_id
from flashtensors.store.locks import model_lock
from flashtensors.store.manifest import ModelRecord, read_manifest, record_from_manifest


def _not_found(model_id: str, layout: StoreLayout, why: str = "is not in the store") -> ModelNotFound:
    if "/" in model_id.partition("@")[0]:
        fetch = f"`flash pull {model_id}` to fetch it"
    else:  # a bare name: a hub pull needs the org, a folder pull takes the name
        fetch = f"`flash pull ORG/{model_id}` or `flash pull ./FOLDER --name {model_id}`"
    return ModelNotFound(
        f"model {model_id!r} {why} ({layout.root})",
        hint=f"run {fetch}, or `flash list` to see the models you have",
    )


def _find(model_id: str, layout: StoreLayout) -> ModelRef:
    """The stored model ``model_id`` names; a bare name matches ``local/<name>`` or one ``<org>/<name>``."""
    try:
        ref = parse_model_id(model_id)
    except ConfigError:
        raise _not_found(model_id, layout, "is neither a file, a folder nor a model name") from None
    if layout.is_present(ref):
        return ref
    if "/" not in model_id.partition("@")[0] and ref.org == DEFAULT_ORG:
        matches = [r for r in layout.present_refs() if r.name == ref.name]
        if len(matches) == 1:
            return ModelRef(matches[0].org, matches[0].name, ref.revision)
        if len(matches) > 1:
            raise ModelNotFound(
                f"{model_id!r} is ambiguous: {', '.join(r.id for r in matches)}",
                hint="name the model with its org, e.g. `flash show " + matches[0].id + "`",
            )
    raise _not_found(model_id, layout)


def resolve_model_path(model_id: str) -> Path:
    """The folder of a stored model, for loaders (``ft.load_state_dict("org/name")`` ends here).

    Args:
        model_id: ``org/name``, ``org/name@revision`` or a bare ``name``.

    Returns:
        The model's folder (stock safetensors, config and tokenizer files, flash-manifest.json).

    Raises:
        ModelNotFound: no such model in the store, or it is stored at another revision; the hint names
            ``flash pull``.

    Example:
        >>> resolve_model_path("Qwen/Qwen3-0.6B")  # doctest: +SKIP
        PosixPath('/home/me/.cache/flashtensors/models/Qwen/Qwen3-0.6B')
    """
    layout = StoreLayout.current()
    ref = _find(model_id, layout)
    if ref.revision is not None:
        source = read_manifest(layout.manifest_path(ref)).get("source") or {}
        commit = str(source.get("commit") or "")
        if ref.revision != source.get("revision") and not (
            len(ref.revision) >= 7 and commit.startswith(ref.revision)
        ):
            raise _not_found(
                model_id, layout, f"is stored at revision {source.get('revision') or commit or '?'}"
            )
    return layout.model_dir(ref)


def list_models() -> list[ModelRecord]:
    """Every model in the store, sorted by name.

    Returns:
        :class:`ModelRecord` items (name, path, size, modified, source, revision, architecture, dtype,
        parameters). Folders without a readable manifest are not models and are left out.

    Example:
        >>> [m.name for m in list_models()]  # doctest: +SKIP
        ['Qwen/Qwen3-0.6B', 'local/my-model']
    """
    layout = StoreLayout.current()
    records = []
    for ref in layout.present_refs():
        try:
            records.append(record_from_manifest(layout, ref, read_manifest(layout.manifest_path(ref))))
        except (StoreError, FileNotFoundError):
            continue  # removed or replaced while we looked, or damaged: not a model we can offer
    return records


def show(model: str) -> dict[str, Any]:
    """The manifest of a stored model (source, revision, architecture, dtype, parameters, files, hashes).

    Raises:
        ModelNotFound: no such model in the store.
    """
    layout = StoreLayout.current()
    ref = _find(model, layout)
    return read_manifest(layout.manifest_path(ref))


def remove(model: str) -> str:
    """Delete a model from the store; a reader sees it whole or not at all.

    Returns:
        The name of the removed model (``org/name``).

    Raises:
        ModelNotFound: no such model in the store.
    """
    layout = StoreLayout.current()
    ref = _find(model, layout)
    with model_lock(layout, ref):
        clean_stale(layout, holding=ref)
        if not layout.is_present(ref):
            raise _not_found(model, layout)
        # One rename makes it disappear for readers; the slow delete happens out of sight.
        doomed = layout.tmp / f"{ref.key}@rm-{uuid.uuid4().hex[:12]}"
        layout.tmp.mkdir(parents=True, exist_ok=True)
        os.rename(layout.model_dir(ref), doomed)
        fsutil.fsync_path(layout.model_dir(ref).parent)
        fsutil.remove_tree(doomed)
        fsutil.remove_tree(layout.download_dir(ref))
    return ref.id


def _repull_command(ref: ModelRef, manifest: dict[str, Any]) -> str:
    source = manifest.get("source") or {}
    src = str(source.get("id") or ref.id)
    cmd = f"flash pull {src}"
    default = src if source.get("type") != "local" else f"{DEFAULT_ORG}/{Path(src).name}"
    if default != ref.id:
        cmd += f" --name {ref.id}"
    return cmd + " --force"


def verify(model: str) -> dict[str, Any]:
    """Re-hash every stored file and compare with the manifest.

    Returns:
        ``{"name", "files", "size", "seconds"}`` when every file matches.

    Raises:
        ModelNotFound: no such model in the store.
        IntegrityError: a file is missing, has another size or another hash; the message names it.

    Example:
        >>> verify("Qwen/Qwen3-0.6B")["files"]  # doctest: +SKIP
        9
    """
    layout = StoreLayout.current()
    ref = _find(model, layout)
    start = time.perf_counter()
    with model_lock(layout, ref, shared=True):
        manifest = read_manifest(layout.manifest_path(ref))
        if manifest.get("hash_algorithm") != HASH_ALGORITHM:
            raise StoreError(
                f"{ref.id}: manifest uses hash {manifest.get('hash_algorithm')!r}, not {HASH_ALGORITHM}"
            )
        problems: list[str] = []
        folder = layout.model_dir(ref)
        for entry in manifest["files"]:
            path = folder / entry["path"]
            if not path.is_file():
                problems.append(f"{entry['path']}: missing")
                continue
            size, digest = hash_file(path)
            if size != entry["size"]:
                problems.append(f"{entry['path']}: {size} bytes, the manifest says {entry['size']}")
            elif digest != entry["hash"]:
                problems.append(
                    f"{entry['path']}: content changed "
                    f"(hash {digest[:16]}..., expected {entry['hash'][:16]}...)"
                )
    if problems:
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
        raise IntegrityError(
            f"{ref.id}: {problems[0]}{more}",
            hint=f"the stored copy is damaged: run `{_repull_command(ref, manifest)}` to fetch it again",
        )
    return {
        "name": ref.id,
        "files": len(manifest["files"]),
        "size": int(manifest.get("size") or 0),
        "seconds": time.perf_counter() - start,
    }
