"""Where things live in the store, and what a model name may look like.

The store is a plain folder a person can read::

    <root>/                          get_settings().storage_path (FLASH_HOME)
      models/<org>/<name>/           one model: the stock files + flash-manifest.json
      .tmp/<org>+<name>@<suffix>     builds in progress, old versions being removed, resumable downloads
      .locks/<org>+<name>.lock       one fcntl lock file per model name

A folder under ``models/`` counts as a model only when it holds ``flash-manifest.json``; builds are made
complete in ``.tmp/`` and renamed into place, so that is always the case for folders the store wrote.
``+`` and ``@`` cannot appear in a name, so ``.tmp`` entries and lock files map back to one model name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from flashtensors.config import get_settings
from flashtensors.errors import ConfigError

MANIFEST_NAME = "flash-manifest.json"
DEFAULT_ORG = "local"  # the org of names given without one (local folders, mostly)
DOWNLOAD_SUFFIX = "download"  # .tmp/<key>@download keeps finished hub files for the next try

# A segment follows the Hugging Face hub's repo-name rules: letters, digits, '.', '_', '-'; no leading dot
# or dash (which also keeps '..' and hidden names out of the tree).
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


@dataclass(frozen=True)
class ModelRef:
    """A parsed model id: ``org/name`` plus an optional revision (``org/name@rev``)."""

    org: str
    name: str
    revision: str | None = None

    @property
    def id(self) -> str:
        """``org/name``, the name the store knows the model by."""
        return f"{self.org}/{self.name}"

    @property
    def key(self) -> str:
        """A one-segment form of :attr:`id` for file names (``org+name``)."""
        return f"{self.org}+{self.name}"

    def __str__(self) -> str:
        return self.id if self.revision is None else f"{self.id}@{self.revision}"


def _check_segment(segment: str, text: str) -> None:
    if not _SEGMENT.fullmatch(segment) or segment.endswith(".") or ".." in segment:
        raise ConfigError(
            f"not a valid model name: {text!r} (use org/name with letters, digits, '.', '_' and '-')",
            hint="for example `flash pull Qwen/Qwen3-0.6B` or `flash pull ./my-model --name me/my-model`",
        )


def parse_model_id(text: str, *, default_org: str | None = DEFAULT_ORG) -> ModelRef:
    """Parse ``org/name``, ``org/name@revision`` or (with a default org) ``name``.

    Args:
        text: the id as the user typed it.
        default_org: org given to a bare ``name``; None makes a bare name an error.

    Returns:
        The :class:`ModelRef`.

    Raises:
        ConfigError: the id is malformed.

    Example:
        >>> parse_model_id("Qwen/Qwen3-0.6B@main")
        ModelRef(org='Qwen', name='Qwen3-0.6B', revision='main')
    """
    body, _, revision = text.strip().partition("@")
    if "@" in text and not revision:
        raise ConfigError(f"empty revision in {text!r}", hint="write org/name@REVISION, or leave out '@'")
    parts = body.split("/")
    if len(parts) == 1 and default_org is not None:
        parts = [default_org, parts[0]]
    if len(parts) != 2:
        raise ConfigError(
            f"not a valid model name: {text!r} (expected org/name)",
            hint="for example `flash pull Qwen/Qwen3-0.6B`",
        )
    for segment in parts:
        _check_segment(segment, text)
    if revision and (revision.startswith(("/", ".")) or "\n" in revision or ".." in revision):
        raise ConfigError(f"not a valid revision: {revision!r}", hint="use a branch, tag or commit hash")
    return ModelRef(parts[0], parts[1], revision or None)


def ref_from_key(key: str) -> ModelRef | None:
    """The model a ``.tmp`` entry or lock file name belongs to, or None if the name is not ours."""
    org, sep, name = key.partition("+")
    if not sep or not _SEGMENT.fullmatch(org) or not _SEGMENT.fullmatch(name):
        return None
    return ModelRef(org, name)


@dataclass(frozen=True)
class StoreLayout:
    """Paths of one store rooted at :attr:`root`."""

    root: Path

    @classmethod
    def current(cls) -> StoreLayout:
        """The store named by the settings in force (``FLASH_HOME`` / ``ft.configure(storage_path=...)``)."""
        return cls(Path(get_settings().storage_path).expanduser().absolute())

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def tmp(self) -> Path:
        return self.root / ".tmp"

    @property
    def locks(self) -> Path:
        return self.root / ".locks"

    def model_dir(self, ref: ModelRef) -> Path:
        return self.models / ref.org / ref.name

    def manifest_path(self, ref: ModelRef) -> Path:
        return self.model_dir(ref) / MANIFEST_NAME

    def lock_path(self, ref: ModelRef) -> Path:
        return self.locks / f"{ref.key}.lock"

    def download_dir(self, ref: ModelRef) -> Path:
        return self.tmp / f"{ref.key}@{DOWNLOAD_SUFFIX}"

    def is_present(self, ref: ModelRef) -> bool:
        return self.manifest_path(ref).is_file()

    def present_refs(self) -> list[ModelRef]:
        """Every model whose manifest exists, sorted by id."""
        found: list[ModelRef] = []
        if not self.models.is_dir():
            return found
        for manifest in self.models.glob(f"*/*/{MANIFEST_NAME}"):
            org, name = manifest.parent.parent.name, manifest.parent.name
            if _SEGMENT.fullmatch(org) and _SEGMENT.fullmatch(name):
                found.append(ModelRef(org, name))
        return sorted(found, key=lambda r: r.id.lower())

    def ensure(self) -> None:
        for path in (self.models, self.tmp, self.locks):
            path.mkdir(parents=True, exist_ok=True)
