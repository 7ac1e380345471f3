"""The transformers backend: build the model on the meta device, then hand it the engine's tensors.

What ``from_pretrained`` does, minus its file reading: the model is constructed with every parameter
and buffer on the meta device (no memory, no random init), the checkpoint is read by the engine straight
onto the target device, and each tensor is assigned to its parameter as is — no copy unless a dtype
conversion is asked for (see ``placement.py`` for the steps and why the result is the same model).

The engine reads on a thread of its own; meanwhile this thread parses the config and the safetensors
headers, builds the model, matches it to the checkpoint and, on a GPU, warms up the first forward
(``warmup.py``). The tokenizer is loaded on a background thread once the weights are in: parsing a real
tokenizer holds the GIL for hundreds of milliseconds, which would stall the engine's thread, and nothing
needs it before the first text prompt.

Checkpoints whose tensor names differ from the model's (transformers 5 renames or fuses some on load,
e.g. mixture-of-experts weights), pre-quantized checkpoints and other unusual cases go through
transformers' own loader instead, still fed with the engine's tensors.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.utils import logging as hf_logging

from flashtensors.backends import Backend
from flashtensors.backends.generation import FlashModel, ModelLoadStats, Pending

# placement.py refuses a transformers older than 5 (no `initialization` module) with a clear error.
from flashtensors.backends.placement import Layout, build_on_meta, place, prepare, read_layout
from flashtensors.backends.warmup import warm_up
from flashtensors.engine import api as engine
from flashtensors.engine import pinned_mmap
from flashtensors.engine.devices import resolve_device
from flashtensors.errors import BackendError, ConfigError, ModelNotFound

logger = logging.getLogger(__name__)

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}  # fmt: skip

# Auto classes tried, in order, to find the one whose mapping gives a config's architecture.
_AUTO_CLASSES = (
    "AutoModelForCausalLM",
    "AutoModelForImageTextToText",
    "AutoModelForSeq2SeqLM",
    "AutoModelForSpeechSeq2Seq",
    "AutoModelForMaskedLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
    "AutoModelForImageClassification",
    "AutoModel",
)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"``/``"bf16"``/``torch.bfloat16``... -> torch dtype; None or ``"auto"`` -> None.

    Raises:
        ConfigError: the name is not a floating-point dtype we know.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name == "auto":
        return None
    if name not in _DTYPE_NAMES:
        raise ConfigError(
            f"unknown dtype {dtype!r}",
            hint="use bfloat16, float16, float32 or auto (the checkpoint's own dtype)",
        )
    return _DTYPE_NAMES[name]


def auto_class_for(config: Any) -> Any:
    """The transformers Auto class that builds ``config.architectures[0]`` (AutoModel when unsure).

    Remote-code models name their classes in ``config.auto_map``; built-in ones are looked up in each
    Auto class's own mapping, so a ``BertForMaskedLM`` checkpoint gets ``AutoModelForMaskedLM``.
    """
    archs = list(getattr(config, "architectures", None) or [])
    auto_map = getattr(config, "auto_map", None) or {}
    for arch in archs:
        for auto_name, ref in auto_map.items():
            if isinstance(ref, str) and ref.rsplit(".", 1)[-1] == arch and hasattr(transformers, auto_name):
                return getattr(transformers, auto_name)
        for auto_name in _AUTO_CLASSES:
            auto = getattr(transformers, auto_name)
            mapping = auto._model_mapping
            if type(config) in mapping and _class_names(mapping[type(config)]) & {arch}:
                return auto
    causal = transformers.AutoModelForCausalLM._model_mapping
    return transformers.AutoModelForCausalLM if type(config) in causal else transformers.AutoModel


def _class_names(classes: Any) -> set[str]:
    items = classes if isinstance(classes, (list, tuple)) else [classes]
    return {c.__name__ for c in items}


def _load_with_transformers(
    model_class: Any, config: Any, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device
) -> Any:
    """transformers' own loader, for checkpoints whose names it must rename or fuse."""
    device_map = None if device.type == "cpu" else {"": device}
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its per-tensor bar would only measure a dict walk here
    try:
        return model_class.from_pretrained(
            None, config=config, state_dict=tensors, dtype=dtype, device_map=device_map
        )
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _resolve_dtype(requested: torch.dtype | None, config: Any, layout: Layout) -> torch.dtype:
    """The dtype to build in: the one asked for, else the config's, else the checkpoint's first float."""
    if requested is not None:
        return requested
    configured = getattr(config, "dtype", None)
    if isinstance(configured, str):
        configured = parse_dtype(configured)
    if isinstance(configured, torch.dtype):
        return configured
    return layout.first_float_dtype


def _read_config(model_dir: Path, trust_remote_code: bool) -> Any:
    try:
        return transformers.AutoConfig.from_pretrained(
            model_dir, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except ValueError as exc:
        hint = "pass trust_remote_code=True if you trust the model's code" if "remote" in str(exc) else None
        raise BackendError(f"transformers cannot read {model_dir / 'config.json'}: {exc}", hint=hint) from exc


def _load_tokenizer(model_dir: Path, trust_remote_code: bool) -> Any:
    try:
        return transformers.AutoTokenizer.from_pretrained(
            model_dir, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        logger.warning("no usable tokenizer in %s (%s); generate() will need token ids", model_dir, exc)
        return None


def _read_generation_config(model_dir: Path, model: Any) -> Any:
    gen_file = model_dir / "generation_config.json"
    if not gen_file.is_file() or not model.can_generate():
        return None
    return transformers.GenerationConfig.from_pretrained(model_dir, local_files_only=True)


def _tokenizer_later(model_dir: Path, trust_remote_code: bool) -> Pending | None:
    if not any((model_dir / name).exists() for name in _TOKENIZER_FILES):
        return None
    return Pending(lambda: _load_tokenizer(model_dir, trust_remote_code), name="flash-tokenizer")


def load_transformers_model(
    model_dir: str | Path,
    *,
    dtype: str | torch.dtype | None = "bfloat16",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    read_path: str | None = None,
    warmup: bool = False,
) -> FlashModel:
    """Load a model folder with transformers, its weights read by the flashtensors engine.

    Args:
        model_dir: a folder with config.json, *.safetensors and (optionally) tokenizer files.
        dtype: "bfloat16", "float16", "float32", or "auto"/None for the checkpoint's dtype.
        device: "cpu", "cuda", "cuda:N"; None picks "cuda" when available, else "cpu".
        trust_remote_code: allow the model's own Python code (from its folder) to run.
        read_path: force an engine read path (see :func:`flashtensors.engine.api.load`).
        warmup: run a small copy of the model once while the weights are read, so that the first
            ``generate`` does not pay for loading GPU libraries and kernels. Off by default: on the
            H100 machine (Qwen3-8B shape, warm) it ran while the engine pinned pages, whose driver
            lock stalled its kernel launches; it took 1.0-1.9 s and made the load return later
            (1.2-2.1 s instead of ~1.0 s) for a first token ~0.4 s sooner.

    Returns:
        A :class:`FlashModel` (``.model``, ``.tokenizer``, ``.load_stats``, ``.generate(...)``). Its
        tokenizer is still loading in the background when this returns; ``.tokenizer`` waits for it.

    Raises:
        ModelNotFound: the folder or its config.json is missing.
        BackendError: transformers cannot build the model, or the weights do not fit it.
        DeviceError: the device is unusable.

    Example:
        >>> llm = load_transformers_model("/models/Qwen3-0.6B", device="cuda")  # doctest: +SKIP
    """
    start = time.perf_counter()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelNotFound(
            f"{model_dir} has no config.json, so transformers cannot tell what model it is",
            hint="point at a model folder (config.json + *.safetensors), or `flash pull MODEL` first",
        )
    dev = resolve_device(device)
    requested = parse_dtype(dtype)
    warm_seconds = None
    # The engine reads the weights (I/O and DMA, the GIL released) while this thread does everything
    # that needs only the config and the headers.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="flash-load") as pool:
        # pin_cache=False: files in the page cache go through the staging ring, not pinned in place.
        # Unpinning 16 GB afterwards holds the driver's lock for ~0.1 s, which the first generate would
        # wait out. Measured on the H100 machine (8B shape, warm, three leases), load + first token took
        # 1.40, 1.11 and 1.24 s (medians) this way, against 1.70, 1.21 and 1.28 s with the cache pinned.
        pending = pool.submit(engine.load, model_dir, device=dev, read_path=read_path, pin_cache=False)
        config = _read_config(model_dir, trust_remote_code)
        layout = read_layout(model_dir)
        target = _resolve_dtype(requested, config, layout)
        auto = auto_class_for(config)
        model = build_on_meta(auto, config, target, trust_remote_code)
        prepared = prepare(model, layout, target, dev)
        gen_config = _read_generation_config(model_dir, model)
        builtin = type(model).__module__.startswith("transformers.")  # no remote code in a warm-up
        can_warm = prepared is not None and builtin and model.can_generate()
        if can_warm and warmup:
            warm_seconds = warm_up(
                auto, config, target, dev, reserve_bytes=layout.arena_bytes, generation_config=gen_config
            )
        result = pending.result()
    # Keep only the stats: the result's dict would otherwise hold the uncast tensors alive.
    tensors, load_stats = result.tensors, result.stats
    del result
    if prepared is not None:
        place(prepared, tensors)
        placement = "assigned"
    else:
        model = _load_with_transformers(type(model), config, tensors, target, dev)
        placement = "transformers"
    del tensors
    model.eval()
    if gen_config is not None:
        model.generation_config = gen_config
    tokenizer = _tokenizer_later(model_dir, trust_remote_code)
    # A forced read_path="pinned-mmap" pins the page cache and unpins it on a background thread, and
    # cudaHostUnregister holds the driver's lock: measured on the H100 machine (8B), the first generate
    # took 1.02 s while it ran and 0.64 s after it. The model returned here must run at full speed at
    # once, so wait for it (most of it overlaps the placement above).
    pinned_mmap.wait_for_releases()
    stats = ModelLoadStats(
        nbytes=load_stats.nbytes,
        weights_seconds=load_stats.seconds,
        total_seconds=time.perf_counter() - start,
        device=str(dev),
        dtype=str(target).removeprefix("torch."),
        paths=dict(load_stats.paths),
        placement=placement,
        warmup_seconds=warm_seconds,
    )
    return FlashModel(model=model, tokenizer=tokenizer, load_stats=stats, model_dir=model_dir)


class TransformersBackend(Backend):
    """``backend="transformers"``: any model transformers can build, weights loaded by the engine."""

    name = "transformers"

    def load(self, model_dir: Path, dtype: str | None, device: str | None, **kwargs: Any) -> FlashModel:
        """See :func:`load_transformers_model`; accepts ``trust_remote_code``, ``read_path``, ``warmup``."""
        unknown = sorted(set(kwargs) - {"trust_remote_code", "read_path", "warmup"})
        if unknown:
            raise BackendError(
                f"the transformers backend does not take {', '.join(unknown)}",
                hint="accepted options: trust_remote_code, read_path, warmup",
            )
        return load_transformers_model(model_dir, dtype=dtype, device=device, **kwargs)
