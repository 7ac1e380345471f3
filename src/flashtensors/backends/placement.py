"""Build a transformers model on the meta device and give it the engine's tensors, as from_pretrained would.

Everything that needs only the config and the safetensors headers (the model on meta, which tensors the
checkpoint holds, their shapes, the dtype each one ends in) is done by :func:`prepare` while the engine
is still reading; :func:`place` is what must wait for the weights. The steps after the weights arrive
follow transformers 5's own loader, in its order, so the result is the same model bit for bit: flag loaded
tensors as initialized, give missing weights and non-persistent buffers real storage, run the model's
``initialize_weights`` (which only touches what is not flagged: rotary ``inv_freq``, ``position_ids``,
weights absent from the checkpoint), then tie.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from flashtensors.engine.plan import make_plan, resolve_files
from flashtensors.errors import BackendError
from flashtensors.format.safetensors import DTYPES

try:
    from transformers import initialization as hf_init
except ImportError as exc:  # transformers 4.x has no `initialization` module
    if getattr(exc, "name", None) == "transformers":
        raise  # not installed at all: get_backend names the extra to install
    raise BackendError(
        "the transformers backend needs transformers >= 5", hint="pip install -U 'transformers>=5'"
    ) from exc

logger = logging.getLogger(__name__)

# Newer transformers 5 releases keep a few creation ops (linspace) off the meta device during __init__.
_meta_safe_ops = getattr(hf_init, "meta_device_safe_creation_ops", contextlib.nullcontext)


@dataclass(frozen=True)
class Layout:
    """What the checkpoint holds, from its headers alone: name -> (shape, dtype), in checkpoint order."""

    tensors: dict[str, tuple[tuple[int, ...], torch.dtype | None]]
    arena_bytes: int

    @property
    def first_float_dtype(self) -> torch.dtype:
        """The dtype of the first floating-point tensor (what ``dtype="auto"`` means without a config)."""
        floats = (d for _, d in self.tensors.values() if d is not None and d.is_floating_point)
        return next(floats, torch.float32)


def read_layout(model_dir: Path) -> Layout:
    """Parse and validate the headers of every safetensors file of ``model_dir`` (no data is read).

    Raises:
        FormatError, ModelNotFound: as the engine would for the same folder.
    """
    plan = make_plan(resolve_files(model_dir))
    out: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
    for p in plan.placements:
        attr = DTYPES[p.info.dtype][1]
        out[p.info.name] = (tuple(p.info.shape), getattr(torch, attr, None))
    return Layout(out, plan.arena_size)


# torch.nn.init functions and in-place random fills that give a tensor its first values.
_INIT_FUNCS = frozenset(
    f
    for f in [
        *(
            getattr(torch.nn.init, n, None)
            for n in (
                "uniform_",
                "normal_",
                "trunc_normal_",
                "constant_",
                "ones_",
                "zeros_",
                "eye_",
                "dirac_",
                "xavier_uniform_",
                "xavier_normal_",
                "kaiming_uniform_",
                "kaiming_normal_",
                "orthogonal_",
                "sparse_",
            )
        ),
        *(
            getattr(torch.Tensor, n, None)
            for n in (
                "uniform_",
                "normal_",
                "zero_",
                "fill_",
                "random_",
                "bernoulli_",
                "exponential_",
                "geometric_",
                "cauchy_",
                "log_normal_",
            )
        ),
    ]  # fmt: skip
    if f is not None
)


class _SkipInitOnMeta(TorchFunctionMode):
    """Turns weight initializers into no-ops on meta tensors: they hold no values, and the decompositions
    that run them anyway cost about half of building a 36-layer model on meta. A torch function mode is
    thread-local, so other threads' initializers are untouched (unlike patching ``torch.nn.init``)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _INIT_FUNCS:
            # torch.nn.init passes its tensor by keyword; Tensor methods pass it as self.
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def build_on_meta(auto: Any, config: Any, dtype: torch.dtype, trust_remote_code: bool) -> Any:
    """``auto.from_config`` with every parameter and buffer on meta and no tying, as from_pretrained builds.

    Raises:
        BackendError: transformers cannot build the model (or it needs remote code that is not trusted).
    """
    try:
        with torch.device("meta"), _meta_safe_ops(), hf_init.no_tie_weights(), _SkipInitOnMeta():
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


# Where a checkpoint tensor goes: its module, the attribute name, and requires_grad (None: a buffer).
Slot = tuple[torch.nn.Module, str, bool | None]


@dataclass
class Prepared:
    """A model on meta, checked against the checkpoint's headers, waiting for its weights."""

    model: Any
    device: torch.device
    wanted: dict[str, torch.dtype]  # checkpoint key -> the dtype its parameter ends in
    shapes: dict[str, torch.Size]  # checkpoint key -> the shape the model expects
    missing: set[str]  # model keys the checkpoint lacks
    really_missing: list[str]  # of those, the ones no tied weight will fill
    buffers: list[tuple[str, torch.Tensor]]  # non-persistent buffers (never in a checkpoint), on meta
    slots: dict[str, Slot] | None  # None: some module hooks into load_state_dict, which must run


def _non_persistent_buffers(model: Any) -> list[tuple[str, torch.Tensor]]:
    out = []
    for module_name, module in model.named_modules():
        for name, buf in module._buffers.items():
            if buf is not None and name in module._non_persistent_buffers_set:
                out.append((f"{module_name}.{name}" if module_name else name, buf))
    return out


def _needs_load_state_dict(model: Any) -> bool:
    """Whether some module hooks into ``load_state_dict`` (then it must run, not a plain assignment)."""
    if torch.__future__.get_swap_module_params_on_conversion():
        return True
    base = torch.nn.Module._load_from_state_dict
    return any(
        m._load_state_dict_pre_hooks
        or m._load_state_dict_post_hooks
        or type(m)._load_from_state_dict is not base
        for m in model.modules()
    )


def _slots(model: Any, keys: list[str]) -> dict[str, Slot] | None:
    if _needs_load_state_dict(model):
        return None
    modules = dict(model.named_modules(remove_duplicate=False))
    out: dict[str, Slot] = {}
    for key in keys:
        parent_name, _, name = key.rpartition(".")
        parent = modules[parent_name]
        old = parent._parameters.get(name)
        out[key] = (parent, name, old.requires_grad if isinstance(old, torch.nn.Parameter) else None)
    return out


def prepare(model: Any, layout: Layout, dtype: torch.dtype, device: torch.device) -> Prepared | None:
    """Match the checkpoint's tensors to ``model`` (on meta) and work out where each one goes; None when
    transformers' loader must rename or fuse them (names that are not the model's), or the checkpoint is
    pre-quantized. Needs no weights: it runs while the engine reads them.

    Raises:
        BackendError: a tensor's shape differs from the one the model expects.
    """
    meta_sd = model.state_dict()
    if not set(layout.tensors) <= set(meta_sd) or getattr(model.config, "quantization_config", None):
        return None
    for key, (shape, _) in layout.tensors.items():
        if torch.Size(shape) != meta_sd[key].shape:
            raise BackendError(
                f"{key}: the checkpoint holds shape {tuple(shape)}, the model expects "
                f"{tuple(meta_sd[key].shape)}",
                hint="the weights do not fit config.json: pull the model again (`flash pull MODEL --force`)",
            )
    plan = _dtype_plan(model, dtype)
    wanted = {key: next((d for p, d in plan if p.search(key)), meta_sd[key].dtype) for key in layout.tensors}
    shapes = {key: meta_sd[key].shape for key in layout.tensors}
    missing = set(meta_sd) - set(layout.tensors)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    # A tied source the checkpoint lacks while holding its target: tie_weights shares the target's tensor.
    covered = set(tied) | {source for target, source in tied.items() if target in layout.tensors}
    return Prepared(
        model,
        device,
        wanted,
        shapes,
        missing,
        sorted(missing - covered),
        _non_persistent_buffers(model),
        _slots(model, list(layout.tensors)),
    )


def _set_tensor(model: Any, key: str, value: torch.Tensor) -> None:
    parent_name, _, name = key.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if name in parent._parameters:
        old = parent._parameters[name]
        parent._parameters[name] = torch.nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        parent._buffers[name] = value


def _assign(model: Any, tensors: dict[str, torch.Tensor], slots: dict[str, Slot] | None) -> None:
    """Put each tensor in its parameter's or buffer's place, as ``load_state_dict(assign=True)`` does.

    The same ``setattr`` that method ends in, at slots found beforehand, without its walk over every
    module and state dict prefix (tens of ms for a 36-layer model, on the critical path once the weights
    are in); models that hook into loading get the real method.
    """
    if slots is None:
        model.load_state_dict(tensors, strict=False, assign=True)
        for key in tensors:
            model.get_parameter_or_buffer(key)._is_hf_initialized = True
        return
    for key, value in tensors.items():
        parent, name, requires_grad = slots[key]
        if requires_grad is not None:
            value = torch.nn.Parameter(value, requires_grad=requires_grad)
        # transformers' initializers skip tensors carrying this flag: it is how from_pretrained keeps
        # loaded weights from being re-initialized, and we rely on the same contract.
        value._is_hf_initialized = True  # type: ignore[attr-defined]
        setattr(parent, name, value)


def place(prepared: Prepared, tensors: dict[str, torch.Tensor]) -> set[str]:
    """Give the prepared model the engine's tensors, in place; return the keys the checkpoint lacked.

    Raises:
        BackendError: the engine returned tensors the headers did not announce, or a tensor was left
            without storage.
    """
    model, device = prepared.model, prepared.device
    if set(tensors) != set(prepared.wanted) or any(t.shape != prepared.shapes[k] for k, t in tensors.items()):
        raise BackendError("the checkpoint's files changed while they were being read", hint="load it again")
    # `.to` returns the very tensor when the dtype already matches: no copy on the common path.
    _assign(model, {k: t.to(prepared.wanted[k]) for k, t in tensors.items()}, prepared.slots)
    for key in getattr(model, "all_tied_weights_keys", None) or {}:
        model.get_parameter(key)._is_hf_initialized = True
    for key in prepared.really_missing:
        _set_tensor(model, key, torch.empty_like(model.get_parameter_or_buffer(key), device=device))
    for key, buf in prepared.buffers:
        _set_tensor(model, key, torch.empty_like(buf, device=device))
    model.initialize_weights()
    try:
        model.tie_weights(missing_keys=prepared.missing, recompute_mapping=False)
    except TypeError:  # transformers 5.0-5.x before tie_weights took the missing keys
        model.tie_weights()
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise BackendError(
            f"{len(still_meta)} tensor(s) were left without storage: {', '.join(still_meta[:5])}"
        )
    if prepared.really_missing:
        logger.warning(
            "%d weight(s) are not in the checkpoint and were initialized at random: %s",
            len(prepared.really_missing),
            ", ".join(prepared.really_missing[:8]),
        )
    return prepared.missing
