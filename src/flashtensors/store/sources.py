"""Where a pull gets its files: a local folder, the Hugging Face cache, or the hub (via huggingface_hub).

Each source ends as a :class:`SourceFiles`: a local folder that holds every selected file, and whether the
store should copy them (a user's folder may be rewritten in place later) or may hard-link them (HF cache
blobs and our own downloads are only ever replaced by rename, never rewritten).
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashtensors.errors import FlashError, FormatError, ModelNotFound, PullError
from flashtensors.store import fsutil
from flashtensors.store.build import disk_full, is_disk_full
from flashtensors.store.layout import ModelRef, StoreLayout
from flashtensors.store.progress import Progress, human_size
from flashtensors.store.select import FileSelection, select_files

_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass
class SourceFiles:
    """Selected files of a source, all present under :attr:`root`."""

    kind: str  # "local", "hf-cache" or "hub"
    id: str  # folder path or hub repo id
    root: Path
    selection: FileSelection
    link: bool
    revision: str | None = None
    commit: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, "id": self.id, "revision": self.revision, "commit": self.commit}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path.name}: cannot read JSON ({exc})") from None


def _top_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def from_folder(folder: Path, *, trust_remote_code: bool) -> SourceFiles:
    """A model folder on this machine (``save_pretrained`` output, a checkout...)."""
    selection = select_files(
        _top_files(folder), trust_remote_code=trust_remote_code, read_index=lambda n: _read_json(folder / n)
    )
    return SourceFiles("local", str(folder), folder, selection, link=False)


def _hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def find_in_hf_cache(repo: ModelRef, *, trust_remote_code: bool) -> SourceFiles | None:
    """A complete snapshot of ``repo`` in the HF cache (``HF_HUB_CACHE``), read without any network.

    The cache layout is ``models--<org>--<name>/{refs/<revision>, snapshots/<commit>/...}``. A snapshot
    counts only if it has weights, every shard its index names, and (when huggingface_hub cached the
    repo's file listing) every file the listing says we would take.
    """
    storage = _hf_cache_dir() / f"models--{repo.org}--{repo.name}"
    revision = repo.revision or "main"
    if _COMMIT.fullmatch(revision):
        commit: str | None = revision
    else:
        try:
            commit = (storage / "refs" / revision).read_text().strip()
        except OSError:
            return None
    snapshot = storage / "snapshots" / str(commit)
    if not commit or not snapshot.is_dir():
        return None
    try:
        selection = select_files(
            _top_files(snapshot),
            trust_remote_code=trust_remote_code,
            read_index=lambda n: _read_json(snapshot / n),
        )
    except FormatError:
        return None  # weights or shards missing: only part of the repo was downloaded
    listed = _cached_listing(repo, str(commit))
    if listed is not None:
        try:
            wanted = select_files(
                listed, trust_remote_code=trust_remote_code, read_index=lambda n: _read_json(snapshot / n)
            )
        except (FormatError, FileNotFoundError):
            return None
        if set(wanted.fetch) - set(selection.fetch):
            return None
    return SourceFiles("hf-cache", repo.id, snapshot, selection, link=True, revision=revision, commit=commit)


def _cached_listing(repo: ModelRef, commit: str) -> list[str] | None:
    try:
        from huggingface_hub import get_cached_repo_tree
    except ImportError:  # older huggingface_hub: no listing cache to consult
        return None
    try:
        return [f.path for f in get_cached_repo_tree(repo.id, revision=commit, cache_dir=_hf_cache_dir())]
    except Exception:  # no listing cached for this commit (the usual case for older downloads)
        return None


def _hub_error(exc: Exception, repo: ModelRef) -> FlashError:
    from huggingface_hub import constants
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = constants.ENDPOINT
    if isinstance(exc, GatedRepoError):
        return PullError(
            f"{repo.id} is gated on {where}: you must accept its terms to download it",
            hint=f"accept them on {where}/{repo.id}, log in with `hf auth login`, then `flash pull {repo}`",
        )
    if isinstance(exc, RepositoryNotFoundError):
        return ModelNotFound(
            f"no model {repo.id!r} on {where} (or it is private)",
            hint="check the name; for a private model log in with `hf auth login` or set HF_TOKEN",
        )
    if isinstance(exc, RevisionNotFoundError):
        return ModelNotFound(
            f"{repo.id} has no revision {repo.revision!r} on {where}",
            hint=f"use a branch, tag or commit of {where}/{repo.id}, e.g. `flash pull {repo.id}`",
        )
    if isinstance(exc, EntryNotFoundError):
        return PullError(f"{repo.id}: a file listed by the hub could not be downloaded: {exc}")
    if isinstance(exc, OfflineModeIsEnabled):
        return PullError(
            f"{repo.id} is not in the HF cache and HF_HUB_OFFLINE is set",
            hint="unset HF_HUB_OFFLINE, or pull a local folder (`flash pull ./folder`)",
        )
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        return PullError(f"{where} answered {status} for {repo.id}: {str(exc).splitlines()[0]}")
    return PullError(
        f"cannot reach {where} to download {repo.id}: {type(exc).__name__}: {exc}",
        hint="check the network (or HF_ENDPOINT); models in the HF cache and local folders pull offline",
    )


def _is_hub_failure(exc: Exception) -> bool:
    from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(
        exc, (HfHubHTTPError, EntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)
    ):
        return True
    module = type(exc).__module__.split(".")[0]
    return module in ("httpx", "httpx2", "requests", "urllib3", "httpcore")


def _bar_class(progress: Progress, name: str) -> type:
    """A tqdm stand-in for huggingface_hub that forwards byte counts to our progress."""

    class _Bar:
        def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **kwargs: Any) -> None:
            progress.start_file(name, total, verb="downloaded")
            if initial:
                progress.advance(name, initial)

        def __enter__(self) -> _Bar:
            return self

        def __exit__(self, *exc: Any) -> None:
            return None

        def update(self, n: int | float | None = 1) -> None:
            progress.advance(name, int(n or 0))

        def close(self) -> None:
            return None

    return _Bar


def from_hub(
    layout: StoreLayout,
    repo: ModelRef,
    store_ref: ModelRef,
    *,
    trust_remote_code: bool,
    force: bool,
    progress: Progress,
) -> SourceFiles:
    """Download the selected files of a hub repo into ``.tmp/<key>@download`` (kept until the pull ends,
    so a pull that dies keeps its finished files for the next one).

    Raises:
        ModelNotFound: no such repo or revision.
        PullError: gated repo, network failure, offline mode.
        StoreError: not enough disk space for the files.
    """
    from huggingface_hub import HfApi, hf_hub_download

    dl = layout.download_dir(store_ref)
    if force:
        fsutil.remove_tree(dl)
    try:
        info = HfApi().model_info(repo.id, revision=repo.revision, files_metadata=True)
    except Exception as exc:
        if _is_hub_failure(exc):
            raise _hub_error(exc, repo) from None
        raise
    commit = info.sha
    sizes = {s.rfilename: s.size for s in info.siblings or []}

    def fetch(name: str) -> Path:
        try:
            path = hf_hub_download(
                repo.id,
                name,
                revision=commit,
                local_dir=dl,
                force_download=force,
                tqdm_class=_bar_class(progress, name),  # type: ignore[arg-type]
            )
        except Exception as exc:
            if _is_hub_failure(exc):
                raise _hub_error(exc, repo) from None
            raise
        progress.end_file(name)
        return Path(path)

    selection = select_files(
        sizes, trust_remote_code=trust_remote_code, read_index=lambda n: _read_json(fetch(n))
    )
    # Files an earlier, interrupted pull finished are not fetched again: huggingface_hub checks the commit
    # it recorded for each of them and returns without a request when it matches.
    todo = selection.fetch
    need = sum(sizes.get(n) or 0 for n in todo if not (dl / n).is_file())
    if need > fsutil.free_bytes(layout.root):
        fsutil.remove_tree(dl)
        raise disk_full(layout, store_ref, need)
    progress.message(f"pulling {repo.id} @ {commit[:12] if commit else '?'}: {human_size(need)} to download")
    try:
        with ThreadPoolExecutor(max_workers=min(4, len(todo))) as pool:
            list(pool.map(fetch, todo))
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        fsutil.remove_tree(dl)  # keeping partial downloads would keep the disk full
        raise disk_full(layout, store_ref, need) from None
    missing = [n for n in selection.fetch if not (dl / n).is_file()]
    if missing:
        raise PullError(f"{repo.id}: download finished without {', '.join(missing)}")
    revision = repo.revision or "main"
    return SourceFiles("hub", repo.id, dl, selection, link=True, revision=revision, commit=commit)


def classify(source: str) -> Path | None:
    """The local folder ``source`` names, or None when it should be read as a hub id.

    Raises:
        ModelNotFound: ``source`` looks like a path (``/``, ``./``, ``~``) but there is no folder there.
    """
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        return path.resolve()
    if source.startswith(("/", "./", "../", "~", ".")) or path.is_file():
        raise ModelNotFound(
            f"no model folder at {source}"
            + (" (it is a file; pull takes the folder)" if path.is_file() else ""),
            hint="pull a folder of *.safetensors + config.json, or a hub id (`flash pull Qwen/Qwen3-0.6B`)",
        )
    return None
