"""Qwen3 shapes for synthetic benchmark checkpoints (the table of BENCH.md).

A :class:`Shape` knows the tensors of a dense ``Qwen3ForCausalLM`` in the order HF checkpoints store them,
and the ``config.json`` transformers needs to build that model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from flashtensors.errors import ConfigError

# Element size and the name transformers uses in config.json, per --dtype spelling.
DTYPES: dict[str, tuple[str, int, str]] = {
    # spelling: (safetensors dtype, bytes per element, torch/transformers name)
    "bf16": ("BF16", 2, "bfloat16"),
    "fp16": ("F16", 2, "float16"),
    "fp32": ("F32", 4, "float32"),
}

# Token ids of the demo tokenizer's specials (flashtensors.demo.SPECIAL_TOKENS: eos, bos, pad).
SPECIAL_IDS = {"eos_token_id": 0, "bos_token_id": 1, "pad_token_id": 2}


@dataclass(frozen=True)
class Shape:
    """The dimensions of a dense Qwen3 model."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor of the checkpoint, ``(name, shape)``, in HF order.

        Returns:
            The list; ``lm_head.weight`` only when embeddings are not tied.

        Example:
            >>> [n for n, _ in SHAPES["qwen3-0.6b"].tensors()][:2]
            ['model.embed_tokens.weight', 'model.layers.0.input_layernorm.weight']
        """
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "mlp.down_proj.weight", (h, self.intermediate)),
                (p + "mlp.gate_proj.weight", (self.intermediate, h)),
                (p + "mlp.up_proj.weight", (self.intermediate, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.k_norm.weight", (self.head_dim,)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, q)),
                (p + "self_attn.q_norm.weight", (self.head_dim,)),
                (p + "self_attn.q_proj.weight", (q, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
            ]
        out.append(("model.norm.weight", (h,)))
        if not self.tied:
            out.append(("lm_head.weight", (self.vocab, h)))
        return out

    def numel(self) -> int:
        """Number of parameters stored in the checkpoint."""
        total = 0
        for _, dims in self.tensors():
            n = 1
            for d in dims:
                n *= d
            total += n
        return total

    def config(self, dtype: str = "bf16") -> dict[str, Any]:
        """A ``config.json`` that transformers accepts for ``Qwen3ForCausalLM``.

        Args:
            dtype: ``bf16``, ``fp16`` or ``fp32``.

        Returns:
            The JSON object as a dict.
        """
        torch_name = DTYPES[dtype][2]
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "tie_word_embeddings": self.tied,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "max_position_embeddings": 40960,
            "max_window_layers": self.layers,
            "rms_norm_eps": 1e-06,
            "rope_scaling": None,
            "rope_theta": 1000000,
            "sliding_window": None,
            "use_sliding_window": False,
            "use_cache": True,
            **SPECIAL_IDS,
            "torch_dtype": torch_name,
            "dtype": torch_name,
            "transformers_version": "4.51.0",
            "flashtensors_bench_shape": asdict(self),
        }


SHAPES: dict[str, Shape] = {
    "qwen3-0.6b": Shape("qwen3-0.6b", 1024, 28, 3072, 16, 8, 128, 151936, True),
    "qwen3-4b": Shape("qwen3-4b", 2560, 36, 9728, 32, 8, 128, 151936, True),
    "qwen3-8b": Shape("qwen3-8b", 4096, 36, 12288, 32, 8, 128, 151936, False),
    "qwen3-14b": Shape("qwen3-14b", 5120, 40, 17408, 40, 8, 128, 151936, False),
    "qwen3-32b": Shape("qwen3-32b", 5120, 64, 25600, 64, 8, 128, 151936, False),
}

_HINT = "see `flash bench make --help` for the shapes and their options"

# A tiny model that runs anywhere: the default of `custom`, overridable field by field.
CUSTOM_DEFAULT = Shape("custom", 64, 2, 128, 4, 2, 16, 1024, False)


def resolve_shape(name: str, **overrides: Any) -> Shape:
    """Look a shape up by name and apply overrides (None values are ignored).

    Args:
        name: one of :data:`SHAPES` or ``custom``.
        **overrides: any :class:`Shape` field (hidden, layers, intermediate, heads, kv_heads, head_dim,
            vocab, tied).

    Returns:
        The shape.

    Raises:
        ConfigError: unknown name, or dimensions that do not make a valid model.

    Example:
        >>> resolve_shape("custom", layers=4).layers
        4
    """
    key = name.lower()
    if key == "custom":
        base = CUSTOM_DEFAULT
    elif key in SHAPES:
        base = SHAPES[key]
    else:
        raise ConfigError(
            f"unknown shape {name!r}; known: {', '.join([*SHAPES, 'custom'])}",
            hint=_HINT,
        )
    given = {k: v for k, v in overrides.items() if v is not None}
    shape = replace(base, **given)
    if given and key != "custom":
        shape = replace(shape, name=f"{key}-modified")
    for field in ("hidden", "layers", "intermediate", "heads", "kv_heads", "head_dim", "vocab"):
        if getattr(shape, field) < 1:
            raise ConfigError(f"{field} must be at least 1, not {getattr(shape, field)}", hint=_HINT)
    if shape.heads % shape.kv_heads:
        raise ConfigError(
            f"heads ({shape.heads}) must be a multiple of kv_heads ({shape.kv_heads})", hint=_HINT
        )
    return shape
