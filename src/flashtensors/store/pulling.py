"""``pull``: put a model (hub id, HF cache entry or local folder) into the store, atomically."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashtensors.errors import ConfigError, StoreError
from flashtensors.store import fsutil
from flashtensors.store.build import Build, clean_stale, disk_full, is_disk_full
from flashtensors.store.layout import ModelRef, StoreLayout, parse_model_id
from flashtensors.store.locks import model_lock
from flashtensors.store.manifest import ModelRecord, read_manifest, record_from_manifest
from flashtensors.store.progress import Progress, human_size, make_progress
from flashtensors.store.sources import SourceFiles, classify, find_in_hf_cache, from_folder, from_hub


@dataclass(frozen=True)
class PullResult(ModelRecord):
    """What :func:`pull` returns: the stored model, and whether it was there already."""

    already_present: bool = False


def _same_source(manifest: dict[str, Any], folder: Path | None, repo: ModelRef | None) -> bool | None:
    """True: the stored model is what was asked for; False: same source at another revision;
    None: another source."""
    source = manifest.get("source") or {}
    if folder is not None:
        return True if source.get("type") == "local" and source.get("id") == str(folder) else None
    assert repo is not None
    if source.get("type") not in ("hub", "hf-cache") or str(source.get("id", "")).lower() != repo.id.lower():
        return None
    wanted = repo.revision or "main"
    commit = str(source.get("commit") or "")
    return wanted == (source.get("revision") or "main") or (len(wanted) >= 7 and commit.startswith(wanted))


def _target(
    source: str, folder: Path | None, revision: str | None, name: str | None
) -> tuple[ModelRef | None, ModelRef]:
    """(hub repo or None, store name) for a pull request."""
    repo: ModelRef | None = None
    if folder is None:
        repo = parse_model_id(source, default_org=None)
        if revision is not None and repo.revision not in (None, revision):
            raise ConfigError(
                f"two revisions given: {repo.revision!r} (in the id) and {revision!r}",
                hint=f"give it once: `flash pull {repo.id}@{revision}`",
            )
        repo = ModelRef(repo.org, repo.name, revision or repo.revision)
    elif revision is not None:
        raise ConfigError(
            "--revision applies to hub models, not to a local folder", hint="leave out --revision"
        )
    if name is not None:
        store = parse_model_id(name)
        if store.revision is not None:
            raise ConfigError(
                f"--name takes org/name without a revision, not {name!r}",
                hint=f"for example `--name {name.partition('@')[0]}`",
            )
    elif repo is not None:
        store = ModelRef(repo.org, repo.name)
    else:
        assert folder is not None
        store = parse_model_id(folder.name)
    return repo, store


def pull(
    source: str,
    *,
    revision: str | None = None,
    name: str | None = None,
    force: bool = False,
    trust_remote_code: bool = False,
    progress: bool | Progress = True,
) -> PullResult:
    """Put a model into the local store (``FLASH_HOME``), from the hub, the HF cache or a folder.

    A hub id already in the Hugging Face cache is taken from there without network. Weights stay stock
    safetensors; ``.bin`` / ``.pt`` weights are converted with ``torch.load(weights_only=True)``. The model
    appears in the store complete or not at all: a killed pull leaves nothing (or the previous version).

    Args:
        source: ``org/name`` or ``org/name@revision`` on the hub, or a folder path.
        revision: hub branch, tag or commit (default: ``main``).
        name: store the model under this ``org/name`` (a folder defaults to ``local/<folder name>``).
        force: fetch again and replace what the store holds under that name.
        trust_remote_code: also keep ``*.py`` files (custom model code).
        progress: True for bars/lines on stderr, False for silence, or a :class:`Progress`.

    Returns:
        The :class:`PullResult` (name, path, size, ...); ``already_present`` when nothing was done.

    Raises:
        ModelNotFound: no such folder, hub repo or revision.
        FormatError: a file is not valid safetensors, or the source holds no weights (nothing is stored).
        PullError: network failure, gated model, offline mode.
        StoreError: the name is taken by another source (use ``force``), or the disk is full.

    Example:
        >>> import flashtensors as ft
        >>> ft.pull("Qwen/Qwen3-0.6B").path  # doctest: +SKIP
        PosixPath('/home/me/.cache/flashtensors/models/Qwen/Qwen3-0.6B')
    """
    layout = StoreLayout.current()
    layout.ensure()
    folder = classify(source)
    repo, ref = _target(source, folder, revision, name)
    reporter = make_progress(progress)
    try:
        with model_lock(
            layout, ref, on_wait=lambda: reporter.message(f"waiting for another pull of {ref.id}")
        ):
            clean_stale(layout, holding=ref)
            if layout.is_present(ref) and not force:
                manifest = read_manifest(layout.manifest_path(ref))
                same = _same_source(manifest, folder, repo)
                if same:
                    return _result(layout, ref, manifest, already_present=True)
                if same is None:
                    was = (manifest.get("source") or {}).get("id")
                    raise StoreError(
                        f"{ref.id!r} is already in the store, pulled from {was}",
                        hint=f"pass --force to replace it, or --name to store {source} under another name",
                    )
            files = _gather(layout, folder, repo, ref, trust_remote_code, force, reporter)
            manifest = _build(layout, ref, files, reporter)
            if files.kind == "hub":
                fsutil.remove_tree(files.root)  # stored now; the download folder has served its purpose
        return _result(layout, ref, manifest, already_present=False)
    finally:
        reporter.close()


def _gather(
    layout: StoreLayout,
    folder: Path | None,
    repo: ModelRef | None,
    ref: ModelRef,
    trust_remote_code: bool,
    force: bool,
    reporter: Progress,
) -> SourceFiles:
    if folder is not None:
        files = from_folder(folder, trust_remote_code=trust_remote_code)
    else:
        assert repo is not None
        cached = None if force else find_in_hf_cache(repo, trust_remote_code=trust_remote_code)
        if cached is not None:
            reporter.message(f"found {repo.id} in the Hugging Face cache: {cached.root}")
            files = cached
        else:
            files = from_hub(
                layout, repo, ref, trust_remote_code=trust_remote_code, force=force, progress=reporter
            )
    if files.selection.skipped_code:
        reporter.message(
            f"left out custom code ({', '.join(files.selection.skipped_code)}); "
            "pass --trust-remote-code to keep it"
        )
    return files


def _build(layout: StoreLayout, ref: ModelRef, files: SourceFiles, reporter: Progress) -> dict[str, Any]:
    sel = files.selection
    if not files.link:
        need = sum((files.root / n).stat().st_size for n in sel.fetch)
        if need > fsutil.free_bytes(layout.root):
            raise disk_full(layout, ref, need)
    build = Build(layout, ref, reporter)
    try:
        for name in sel.keep:
            (build.link if files.link else build.copy)(files.root / name, name)
        for name in sel.convert:
            build.convert(files.root / name, name)
        manifest = build.finish(files.describe())
        build.install()
    except BaseException as exc:
        build.discard()
        if is_disk_full(exc):
            need = sum((files.root / n).stat().st_size for n in sel.fetch if (files.root / n).exists())
            raise disk_full(layout, ref, need) from None
        raise
    reporter.message(f"stored {ref.id}: {len(manifest['files'])} files, {human_size(manifest['size'])}")
    return manifest


def _result(
    layout: StoreLayout, ref: ModelRef, manifest: dict[str, Any], *, already_present: bool
) -> PullResult:
    record = record_from_manifest(layout, ref, manifest)
    return PullResult(**{**record.__dict__, "already_present": already_present})
