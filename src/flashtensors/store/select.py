"""Which files of a source (hub repo, HF cache snapshot, local folder) go into the store.

The same rules for every source, so a model looks the same in the store wherever it came from:

* only top-level files (subfolders hold other formats: ``original/``, ``onnx/``...), no hidden files;
* weights: safetensors when there are any (only the shards the ``*.safetensors.index.json`` names, if there
  is one); otherwise ``.bin`` / ``.pt`` / ``.pth`` weight files, to be converted to safetensors;
* config, generation config, tokenizer and chat-template files: ``*.json``, ``*.txt``, ``*.model``,
  ``*.tiktoken``, ``*.jinja``, ``tokenizer*``; indexes of formats we do not keep are dropped;
* ``*.py`` (remote code) only with ``trust_remote_code``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flashtensors.errors import FormatError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Pickles that trainers write beside checkpoints and that hold no weights (or not model weights).
_NOT_WEIGHTS = ("training_args.bin", "optimizer.*", "scheduler.*", "scaler.*", "rng_state*")
_SIDE_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "tokenizer*")


@dataclass
class FileSelection:
    """Result of :func:`select_files`."""

    keep: list[str] = field(default_factory=list)  # stored as they are
    convert: list[str] = field(default_factory=list)  # pickled weights, converted to safetensors
    skipped_code: list[str] = field(default_factory=list)  # *.py left out (no trust_remote_code)

    @property
    def fetch(self) -> list[str]:
        """Every file the source must provide."""
        return sorted(set(self.keep) | set(self.convert))


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def is_weight_pickle(name: str) -> bool:
    """True for ``pytorch_model.bin``-like files; False for trainer state such as ``optimizer.pt``."""
    return name.endswith(_PICKLE_SUFFIXES) and not _matches(name, _NOT_WEIGHTS)


def _indexed(names: set[str], index: str, read_index: Callable[[str], Any]) -> list[str]:
    doc = read_index(index)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FormatError(f"{index}: no valid 'weight_map' (tensor name -> file)")
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if s not in names]
    if missing:
        raise FormatError(
            f"{index} names {len(missing)} file(s) the source does not have: {', '.join(missing)}"
        )
    return shards


def select_files(
    names: Iterable[str],
    *,
    trust_remote_code: bool,
    read_index: Callable[[str], Any],
) -> FileSelection:
    """Pick the files to store from a source's file names.

    Args:
        names: file paths relative to the source root ('/'-separated).
        trust_remote_code: keep ``*.py`` files.
        read_index: returns the parsed JSON of an index file of the source (it may download it).

    Returns:
        The :class:`FileSelection`.

    Raises:
        FormatError: no weights at all, or an index naming files the source lacks.
    """
    top = {n for n in names if "/" not in n and not n.startswith(".")}
    sel = FileSelection()
    st_indexes = sorted(n for n in top if n.endswith(".safetensors.index.json"))
    safetensors = sorted(n for n in top if n.endswith(".safetensors"))
    if safetensors:
        index = SAFETENSORS_INDEX if SAFETENSORS_INDEX in st_indexes else next(iter(st_indexes), None)
        if index is None:
            sel.keep += safetensors
        else:
            sel.keep += [*_indexed(top, index, read_index), index]
    else:
        pickles = sorted(n for n in top if is_weight_pickle(n))
        if PICKLE_INDEX in top:
            pickles = _indexed(top, PICKLE_INDEX, read_index)
        sel.convert = pickles
    if not sel.keep and not sel.convert:
        raise FormatError("no weights found: no *.safetensors and no pytorch_model*.bin / *.pt files")

    for name in sorted(top):
        if name in sel.keep or name in sel.convert:
            continue
        if name.endswith(".py"):
            (sel.keep if trust_remote_code else sel.skipped_code).append(name)
        elif name.endswith(".index.json"):
            continue  # an index of shards we do not keep (or of the pickles we convert)
        elif _matches(name, _SIDE_FILES) and not name.endswith(".safetensors"):
            sel.keep.append(name)
    sel.keep.sort()
    return sel
