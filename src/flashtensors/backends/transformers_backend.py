"""The transformers backend: build the model on the meta device, then hand it the engine's tensors.

What ``from_pretrained`` does, minus its file reading: the model is constructed with every parameter
and buffer on the meta device (no memory, no random init), the checkpoint is read by the engine straight
onto the target device, and each tensor is assigned to its parameter as is — no copy unless a dtype
conversion is asked for. The steps after that follow transformers 5's own loader, in its order, so the
result is the same model bit for bit: flag loaded tensors as initialized, give missing weights and
non-persistent buffers real storage, run the model's ``initialize_weights`` (which only touches what is
not flagged: rotary ``inv_freq``, ``position_ids``, weights absent from the checkpoint), then tie.

Checkpoints whose tensor names differ from the model's (transformers 5 renames or fuses some on load,
e.g. mixture-of-experts weights), pre-quantized checkpoints and other unusual cases go through
transformers' own loader instead, still fed with the engine's tensors.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from flashtensors.backends import Backend
from flashtensors.backends.generation import FlashModel, ModelLoadStats
from flashtensors.engine import api as engine
from flashtensors.engine.devices import resolve_device
from flashtensors.errors import BackendError, ConfigError, ModelNotFound

try:
    import transformers
    from transformers import initialization as hf_init
    from transformers.utils import logging as hf_logging
except ImportError as exc:  # transformers 4.x has no `initialization` module
    if getattr(exc, "name", None) == "transformers":
        raise
    raise BackendError(
        "the transformers backend needs transformers >= 5",
        hint="pip install -U 'transformers>=5'",
    ) from exc

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


# Newer transformers 5 releases keep a few creation ops (linspace) off the meta device during __init__.
_meta_safe_ops = getattr(hf_init, "meta_device_safe_creation_ops", contextlib.nullcontext)


def _non_persistent_buffers(model: Any) -> list[tuple[str, torch.Tensor]]:
    out = []
    for module_name, module in model.named_modules():
        for name, buf in module._buffers.items():
            if buf is not None and name in module._non_persistent_buffers_set:
                out.append((f"{module_name}.{name}" if module_name else name, buf))
    return out


def _build_on_meta(config: Any, dtype: torch.dtype, trust_remote_code: bool) -> Any:
    auto = auto_class_for(config)
    try:
        # The same context from_pretrained builds in: meta tensors, no tying yet (done after loading).
        with torch.device("meta"), _meta_safe_ops(), hf_init.no_tie_weights():
            return auto.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise BackendError(
                f"{getattr(config, 'architectures', None) or config.model_type} needs code from the model's "
                "repository, which flashtensors does not run unless asked",
                hint="if you trust the model's authors: load_model(..., trust_remote_code=True)",
            ) from exc
        raise BackendError(f"transformers cannot build this model: {exc}") from exc


def _dtype_plan(model: Any, dtype: torch.dtype) -> list[tuple[re.Pattern[str], torch.dtype]]:
    """Weights that stay in float32 whatever ``dtype`` is (the model's keep-in-fp32 lists)."""
    names: list[str] = []
    if dtype == torch.float16:
        names += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        names += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return [(re.compile(n.replace("*", ".*")), torch.float32) for n in names]


def _target_dtypes(
    model: Any, dtype: torch.dtype, meta_sd: dict[str, torch.Tensor]
) -> dict[str, torch.dtype]:
    plan = _dtype_plan(model, dtype)
    out: dict[str, torch.dtype] = {}
    for key, empty in meta_sd.items():
        out[key] = next((d for pattern, d in plan if pattern.search(key)), empty.dtype)
    return out


def _set_tensor(model: Any, key: str, value: torch.Tensor) -> None:
    parent_name, _, name = key.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if name in parent._parameters:
        old = parent._parameters[name]
        parent._parameters[name] = torch.nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        parent._buffers[name] = value


def _place(
    model: Any, tensors: dict[str, torch.Tensor], meta_sd: dict[str, torch.Tensor], device: torch.device
) -> set[str]:
    """Assign ``tensors`` to ``model`` (built on meta) in place; return the keys the checkpoint lacked."""
    missing = set(meta_sd) - set(tensors)
    for key, t in tensors.items():
        if t.shape != meta_sd[key].shape:
            raise BackendError(
                f"{key}: the checkpoint holds shape {tuple(t.shape)}, the model expects "
                f"{tuple(meta_sd[key].shape)}",
                hint="the weights do not fit config.json: pull the model again (`flash pull MODEL --force`)",
            )
    model.load_state_dict(tensors, strict=False, assign=True)
    for key in tensors:
        # transformers' initializers skip tensors carrying this flag: it is how from_pretrained keeps
        # loaded weights from being re-initialized, and we rely on the same contract.
        model.get_parameter_or_buffer(key)._is_hf_initialized = True
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for key in tied:
        model.get_parameter(key)._is_hf_initialized = True
    # A tied source the checkpoint lacks while holding its target: tie_weights shares the target's tensor.
    covered = set(tied) | {source for target, source in tied.items() if target in tensors}
    really_missing = sorted(missing - covered)
    for key in really_missing:
        _set_tensor(model, key, torch.empty_like(meta_sd[key], device=device))
    for key, buf in _non_persistent_buffers(model):
        _set_tensor(model, key, torch.empty_like(buf, device=device))
    model.initialize_weights()
    try:
        model.tie_weights(missing_keys=missing, recompute_mapping=False)
    except TypeError:  # transformers 5.0-5.x before tie_weights took the missing keys
        model.tie_weights()
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise BackendError(
            f"{len(still_meta)} tensor(s) were left without storage: {', '.join(still_meta[:5])}"
        )
    if really_missing:
        logger.warning(
            "%d weight(s) are not in the checkpoint and were initialized at random: %s",
            len(really_missing),
            ", ".join(really_missing[:8]),
        )
    return missing


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


def _resolve_dtype(requested: torch.dtype | None, config: Any, pending: Future[Any]) -> torch.dtype:
    """The dtype to build in: the one asked for, else the config's, else the checkpoint's first float."""
    if requested is not None:
        return requested
    configured = getattr(config, "dtype", None)
    if isinstance(configured, str):
        configured = parse_dtype(configured)
    if isinstance(configured, torch.dtype):
        return configured
    tensors = pending.result().tensors
    return next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)


def _read_config(model_dir: Path, trust_remote_code: bool) -> Any:
    try:
        return transformers.AutoConfig.from_pretrained(
            model_dir, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except ValueError as exc:
        hint = "pass trust_remote_code=True if you trust the model's code" if "remote" in str(exc) else None
        raise BackendError(f"transformers cannot read {model_dir / 'config.json'}: {exc}", hint=hint) from exc


def _load_tokenizer(model_dir: Path, trust_remote_code: bool) -> Any:
    if not any((model_dir / name).exists() for name in _TOKENIZER_FILES):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(
            model_dir, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        logger.warning("no usable tokenizer in %s (%s); generate() will need token ids", model_dir, exc)
        return None


def load_transformers_model(
    model_dir: str | Path,
    *,
    dtype: str | torch.dtype | None = "bfloat16",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    read_path: str | None = None,
) -> FlashModel:
    """Load a model folder with transformers, its weights read by the flashtensors engine.

    Args:
        model_dir: a folder with config.json, *.safetensors and (optionally) tokenizer files.
        dtype: "bfloat16", "float16", "float32", or "auto"/None for the checkpoint's dtype.
        device: "cpu", "cuda", "cuda:N"; None picks "cuda" when available, else "cpu".
        trust_remote_code: allow the model's own Python code (from its folder) to run.
        read_path: force an engine read path (see :func:`flashtensors.engine.api.load`).

    Returns:
        A :class:`FlashModel` (``.model``, ``.tokenizer``, ``.load_stats``, ``.generate(...)``).

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
    # The engine reads the weights (I/O, no GIL held) while this thread parses the config, builds the
    # model on meta and loads the tokenizer: those cost tens of milliseconds that need not add up.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="flash-load") as pool:
        pending = pool.submit(engine.load, model_dir, device=dev, read_path=read_path)
        config = _read_config(model_dir, trust_remote_code)
        target = _resolve_dtype(requested, config, pending)
        model = _build_on_meta(config, target, trust_remote_code)
        tokenizer = _load_tokenizer(model_dir, trust_remote_code)
        result = pending.result()
    # Keep only the stats: the result's dict would otherwise hold the uncast tensors alive.
    tensors, load_stats = result.tensors, result.stats
    del result
    meta_sd = model.state_dict()
    names_match = set(tensors) <= set(meta_sd)
    if names_match and getattr(config, "quantization_config", None) is None:
        wanted = _target_dtypes(model, target, meta_sd)
        # `.to` returns the very tensor when the dtype already matches: no copy on the common path.
        tensors = {k: t.to(wanted[k]) for k, t in tensors.items()}
        _place(model, tensors, meta_sd, dev)
        placement = "assigned"
    else:
        model = _load_with_transformers(type(model), config, tensors, target, dev)
        placement = "transformers"
    del tensors
    model.eval()
    gen_file = model_dir / "generation_config.json"
    if gen_file.is_file() and model.can_generate():
        model.generation_config = transformers.GenerationConfig.from_pretrained(
            model_dir, local_files_only=True
        )
    stats = ModelLoadStats(
        nbytes=load_stats.nbytes,
        weights_seconds=load_stats.seconds,
        total_seconds=time.perf_counter() - start,
        device=str(dev),
        dtype=str(target).removeprefix("torch."),
        paths=dict(load_stats.paths),
        placement=placement,
    )
    return FlashModel(model=model, tokenizer=tokenizer, load_stats=stats, model_dir=model_dir)


class TransformersBackend(Backend):
    """``backend="transformers"``: any model transformers can build, weights loaded by the engine."""

    name = "transformers"

    def load(self, model_dir: Path, dtype: str | None, device: str | None, **kwargs: Any) -> FlashModel:
        """See :func:`load_transformers_model`; accepts ``trust_remote_code`` and ``read_path``."""
        unknown = sorted(set(kwargs) - {"trust_remote_code", "read_path"})
        if unknown:
            raise BackendError(
                f"the transformers backend does not take {', '.join(unknown)}",
                hint="accepted options: trust_remote_code, read_path",
            )
        return load_transformers_model(model_dir, dtype=dtype, device=device, **kwargs)
