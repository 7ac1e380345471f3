"""The loaders `flash bench run` compares: flashtensors and its peers, each called the way its docs say.

Every loader turns a checkpoint (folder + its safetensors files) into ``name -> tensor`` on one device.
Each is imported before the clock starts (import time is not load time). Peers that are not installed are
skipped with a note; a peer that cannot serve a device (InstantTensor on CPU) is skipped the same way.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Target:
    """What a loader reads: the checkpoint folder and its safetensors files, in index order."""

    directory: Path
    files: tuple[Path, ...]


def _cuda0(device: str) -> str:
    return "cuda:0" if device == "cuda" else device


_details: dict[str, Any] = {}


def take_details() -> dict[str, Any]:
    """What the last load said about itself, then forget it. flashtensors reports the read path each
    file took (``read_paths``: file name -> path) and, where it read files, when its reads ran
    (``reads``); the peers report nothing."""
    out = dict(_details)
    _details.clear()
    return out


def read_paths(paths: Mapping[str, str]) -> dict[str, str]:
    """The engine's per-file read paths (``stats.paths``) as a run records them: file name -> path."""
    return {Path(path).name: mode for path, mode in paths.items()}


def _flashtensors(target: Target, device: str) -> Mapping[str, Any]:
    from flashtensors.engine.api import load

    result = load(str(target.directory), device=device)
    _details["read_paths"] = read_paths(result.stats.paths)
    if result.stats.reads is not None:  # seconds after the load began: first read's start, last one's end
        _details["reads"] = [round(t, 6) for t in result.stats.reads]
    return result.tensors


def _safetensors(target: Target, device: str) -> Mapping[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in target.files:
        out.update(load_file(str(f), device=device))
    return out


def _safetensors_mmap(target: Target, device: str) -> Mapping[str, Any]:
    from safetensors import safe_open

    out: dict[str, Any] = {}
    for f in target.files:
        with safe_open(str(f), "pt", device="cpu") as st:
            for name in st.keys():
                out[name] = st.get_tensor(name).to(device)
    return out


def _transformers(target: Target, device: str) -> Mapping[str, Any]:
    return _transformers_model(target, device).state_dict()


def _transformers_model(target: Target, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(target.directory), device_map=device, dtype="auto")


def _fastsafetensors(target: Target, device: str) -> Mapping[str, Any]:
    from fastsafetensors import fastsafe_open

    # Its docs: tensors share ownership of the backing buffer and stay valid after the context closes.
    with fastsafe_open([str(f) for f in target.files], device=_cuda0(device), nogds=True) as st:
        return {name: st.get_tensor(name) for name in st.keys()}


def _runai(target: Target, device: str) -> Mapping[str, Any]:
    from runai_model_streamer import SafetensorsStreamer

    out: dict[str, Any] = {}
    with SafetensorsStreamer() as streamer:
        streamer.stream_files([str(f) for f in target.files], device=_cuda0(device))
        for name, tensor in streamer.get_tensors():
            # On CPU it yields views of a buffer it reuses for the next chunk: keep a copy.
            out[name] = tensor.clone() if device == "cpu" else tensor
    return out


def _instanttensor(target: Target, device: str) -> Mapping[str, Any]:
    import torch
    from instanttensor import safe_open

    index = torch.device(_cuda0(device)).index or 0
    with safe_open([str(f) for f in target.files], framework="pt", device=index) as st:
        return dict(st.tensors())


@dataclass(frozen=True)
class Loader:
    """A way to load a checkpoint: its name, the modules it needs, the devices it serves, the call."""

    name: str
    modules: tuple[str, ...]
    devices: tuple[str, ...]
    load: Callable[[Target, str], Mapping[str, Any]]
    description: str


LOADERS: dict[str, Loader] = {
    loader.name: loader
    for loader in (
        Loader(
            "flashtensors",
            ("flashtensors.engine.api",),
            ("cpu", "cuda"),
            _flashtensors,
            "flashtensors.engine.api.load(dir, device=dev).tensors",
        ),
        Loader(
            "safetensors",
            ("safetensors.torch",),
            ("cpu", "cuda"),
            _safetensors,
            "safetensors.torch.load_file(f, device=dev) per shard",
        ),
        Loader(
            "safetensors-mmap",
            ("safetensors",),
            ("cpu", "cuda"),
            _safetensors_mmap,
            'safe_open(f, "pt", device="cpu") then .to(dev) per tensor',
        ),
        Loader(
            "transformers",
            ("transformers", "accelerate"),
            ("cpu", "cuda"),
            _transformers,
            "AutoModelForCausalLM.from_pretrained(dir, device_map=dev, dtype='auto')",
        ),
        Loader(
            "fastsafetensors",
            ("fastsafetensors",),
            ("cpu", "cuda"),
            _fastsafetensors,
            "fastsafe_open(files, device=dev, nogds=True)",
        ),
        Loader(
            "runai",
            ("runai_model_streamer",),
            ("cpu", "cuda"),
            _runai,
            "SafetensorsStreamer().stream_files(files, device=dev)",
        ),
        Loader(
            "instanttensor",
            ("instanttensor",),
            ("cuda",),
            _instanttensor,
            'instanttensor.safe_open(files, framework="pt", device=0).tensors()',
        ),
    )
}

# Loaders whose e2e (a model that generates) has a meaning: the ones that build a model.
E2E_LOADERS = ("flashtensors", "transformers")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def unavailable(name: str, device: str, scenario: str = "warm") -> str | None:
    """Why ``name`` cannot run ``scenario`` on ``device`` (None: it can). Never imports the loader.

    Args:
        name: a key of :data:`LOADERS`.
        device: ``cpu`` or ``cuda[:N]``.
        scenario: cold, warm, hot or e2e.

    Returns:
        A one-line note, or None.
    """
    loader = LOADERS[name]
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if kind not in loader.devices:
        return f"{name} supports only {', '.join(loader.devices)}"
    missing = [m for m in loader.modules if not _installed(m)]
    if missing:
        return f"not installed ({', '.join(missing)}); `pip install 'flashtensors[bench]'` adds the peers"
    if scenario == "e2e":
        if name not in E2E_LOADERS:
            return f"e2e needs a model that generates; only {' and '.join(E2E_LOADERS)} build one"
        if name == "flashtensors" and not _installed("transformers"):
            return "e2e uses the transformers backend, which is not installed"
        if name == "flashtensors" and not _installed("flashtensors.models"):
            return "ft.load_model is not available in this build"
    return None


def import_loader(name: str, target: Target, scenario: str = "warm") -> None:
    """Import what a loader needs (torch included), so that the timed call does not pay for imports.

    For transformers and for every e2e run this includes the model's class (transformers imports it on
    first use) and, for e2e, the tokenizer classes and flashtensors' transformers backend.
    """
    import torch  # noqa: F401

    for module in LOADERS[name].modules:
        importlib.import_module(module)
    if name == "transformers" or scenario == "e2e":
        from transformers import AutoConfig, AutoTokenizer  # noqa: F401
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(str(target.directory)))]
    if name == "flashtensors" and scenario == "e2e":
        importlib.import_module("flashtensors.models")
        importlib.import_module("flashtensors.backends.transformers_backend")


def warm_resident(device: str) -> None:
    """Run :func:`resident`'s page touch once before the clock, over memory no loader returned.

    On CPU it sums one byte per page. After a cache drop, the first such sum in a process read torch's
    code for it back from the disk, and started torch's CPU threads: 91-112 ms and 17-18 major faults on
    this project's CPU machine, charged to every CPU run's clock, while the load itself took 9-11 ms.
    A page of that code mapped by this process stays resident through a later cache drop.
    """
    if device.startswith("cuda"):
        return
    import torch

    # More touched pages than one reduction task takes (torch's grain is 32768 elements), so the warm
    # sum runs in parallel as a large load's does. Never written, so the pages read are the kernel's
    # shared zero page: no memory is used.
    pages = 2 * 32768 + 1
    resident({"warm-up": torch.empty(pages * 4096, dtype=torch.uint8)}, device)


def resident(state: Mapping[str, Any], device: str) -> int:
    """Make sure every tensor is really in memory; returns the bytes held.

    On CUDA a synchronize suffices. On CPU some loaders return tensors backed by a private mmap of the
    file (safetensors does), whose pages arrive only when touched: one byte per 4 KiB page is read so
    that every loader pays for bringing its bytes in, as a GPU copy would.
    """
    import torch

    total = 0
    seen: set[tuple[int, int]] = set()
    for tensor in state.values():
        nbytes = tensor.numel() * tensor.element_size()
        key = (tensor.data_ptr(), nbytes)
        if key in seen:  # tied weights: one tensor under two names
            continue
        seen.add(key)
        total += nbytes
        if not device.startswith("cuda") and nbytes:
            flat = tensor.detach().reshape(-1).view(torch.uint8)
            flat[::4096].sum()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return total
