"""Pay a model's first-forward costs on the GPU while its weights are still being read.

A process's first forward on a GPU pays for much more than its arithmetic: the cuBLAS handle and
workspace, every kernel loaded on its first launch (CUDA loads modules lazily), the attention backend's
setup, the caching allocator's first segments, transformers' own first-call work in ``generate``.
``from_pretrained`` users pay all that in their first token. We build a copy of the model with one
layer (one per distinct layer type) and a small vocabulary, with zeros for weights, and run ``generate``
on it while the engine reads the real weights: the same classes, dtype and layer shapes, so the same
kernels, without touching the real model or the random number generators.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from itertools import chain
from typing import Any

import torch

from flashtensors.backends.placement import build_on_meta

logger = logging.getLogger(__name__)

_VOCAB = 1024  # enough rows for the prompt ids below; the real lm_head's width would cost GBs here
_PROMPT_TOKENS = 8
_HEADROOM = 1 << 30  # free GPU memory left over after the model and its warm-up copy

_done: set[str] = set()
_done_lock = threading.Lock()


def small_config(config: Any) -> Any | None:
    """``config`` with one layer per distinct layer type and a small vocabulary; None when the model is
    not a plain stack of layers (composite models, quantized checkpoints, no ``num_hidden_layers``)."""
    if getattr(config, "sub_configs", None) or getattr(config, "quantization_config", None):
        return None
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers < 1:
        return None
    small = copy.deepcopy(config)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == layers:
        small.layer_types = list(dict.fromkeys(types))
        small.num_hidden_layers = len(small.layer_types)
    else:
        small.num_hidden_layers = 1
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int):
        small.vocab_size = min(vocab, _VOCAB)
    if getattr(small, "pad_token_id", None) is not None:
        small.pad_token_id = None  # it may lie beyond the small vocabulary; it only matters to gradients
    return small


def _generation_configs(base: Any) -> list[Any]:
    """A greedy and a sampled configuration, so both decoding paths load their kernels; exactly two new
    tokens each (no end-of-sequence id), so a cached decoding step runs after the prompt's."""
    from transformers import GenerationConfig

    common = {"max_new_tokens": 2, "num_beams": 1, "eos_token_id": None, "pad_token_id": 0}
    greedy = GenerationConfig(do_sample=False, **common)
    sampled = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, top_k=50, **common)
    if base is not None and getattr(base, "cache_implementation", None):
        for gen in (greedy, sampled):
            gen.cache_implementation = base.cache_implementation
    return [greedy, sampled]


def warm_up(
    auto: Any,
    config: Any,
    dtype: torch.dtype,
    device: torch.device,
    *,
    reserve_bytes: int = 0,
    generation_config: Any = None,
) -> float | None:
    """Run ``generate`` on a small copy of the model on ``device``, once per process and shape.

    Args:
        auto: the transformers Auto class that builds the model.
        config: the model's config (not modified).
        dtype: the dtype the model runs in.
        device: where it runs.
        reserve_bytes: GPU memory the real weights still need (skipped unless it stays free).
        generation_config: the model's own, for its cache implementation.

    Returns:
        The seconds it took, or None when it was skipped (already done for this shape in this process,
        a model it does not apply to, too little free memory, or a failure, which is logged at debug
        level and otherwise ignored: it changes no state the real model sees).

    Example:
        >>> auto = transformers.AutoModelForCausalLM
        >>> warm_up(auto, config, torch.bfloat16, torch.device("cuda"))  # doctest: +SKIP
    """
    start = time.perf_counter()
    small = small_config(config)
    if small is None:
        return None
    key = f"{device}|{dtype}|{type(config).__name__}|{small.to_json_string(use_diff=False)}"
    with _done_lock:
        if key in _done:
            return None
        _done.add(key)  # a failed or skipped attempt is not retried either
    try:
        ran = _run(auto, small, dtype, device, reserve_bytes, generation_config)
    except Exception as exc:  # a warm-up must never break a load
        logger.debug("GPU warm-up skipped: %s: %s", type(exc).__name__, exc)
        return None
    return time.perf_counter() - start if ran else None


def _run(auto: Any, small: Any, dtype: torch.dtype, device: torch.device, reserve: int, base: Any) -> bool:
    on_gpu = device.type == "cuda"
    # Sampling draws random numbers: the real model must find the generators as they were, so that
    # weights missing from a checkpoint are initialized exactly as from_pretrained would.
    with torch.random.fork_rng(devices=[device] if on_gpu else []):
        model = build_on_meta(auto, small, dtype, trust_remote_code=False)
        tensors = list(chain(model.parameters(), model.buffers()))
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if on_gpu and torch.cuda.mem_get_info(device)[0] < reserve + 2 * nbytes + _HEADROOM:
            return False
        model.to_empty(device=device)
        with torch.no_grad():
            for t in chain(model.parameters(), model.buffers()):
                t.zero_()
        model.eval()
        ids = torch.arange(1, _PROMPT_TOKENS + 1, device=device).unsqueeze(0) % small.vocab_size
        with torch.inference_mode():
            for gen in _generation_configs(base):
                model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        if on_gpu:
            torch.cuda.synchronize(device)
    return True
