"""The built-in default model, ``flashtensors/tiny-random-qwen3``: built offline, byte for byte the same.

A real architecture (``Qwen3ForCausalLM``, tied embeddings, bf16) with a few small layers and random
weights from fixed seeds, plus a working byte-level BPE tokenizer trained here on a short built-in text.
It is written as a normal Hugging Face folder (config.json, generation_config.json, model.safetensors,
tokenizer files), so transformers, vLLM and flashtensors all load it like any hub model. Its text is
noise — the weights are random — but every step of ``flash run`` and ``flash demo`` is the real one.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from flashtensors.errors import ModelNotFound, StoreError

DEFAULT_MODEL_ID = "flashtensors/tiny-random-qwen3"

SEED = 1234
HIDDEN = 512
LAYERS = 4
INTERMEDIATE = 1536
HEADS = 8
KV_HEADS = 4
HEAD_DIM = 64
VOCAB_TARGET = 1024
SPECIAL_TOKENS = ("<|endoftext|>", "<|startoftext|>", "<|pad|>")  # eos, bos, pad: ids 0, 1, 2

# The tokenizer's training text, written for this file. Varied on purpose, so the merges cover common
# English words, numbers and code-ish punctuation.
CORPUS = """\
Model weights live on disk as large files of numbers. Before a model can answer, every one of those
numbers has to travel from the disk into the memory of a graphics card. For a small model this takes a
moment; for a large one it can take minutes, and people wait. flashtensors moves the weights at the speed
of the hardware: it reads the file with direct input and output when the data is cold, pins the page cache
when the data is warm, and copies straight to the device without stopping on the way.

The morning was quiet. A cat walked along the garden wall, stopped to look at the birds, and then went back
to sleep in the sun. Somewhere a kettle started to whistle, and the smell of fresh bread came from the open
window. The children were still asleep, and the town had not yet woken up.

A checkpoint is a folder. It holds a config file that says what the model looks like: how many layers, how
wide each layer is, how many attention heads there are, and how large the vocabulary is. It also holds the
tokenizer, which turns text into numbers and numbers back into text, and one or more safetensors files with
the weights themselves. Each safetensors file starts with a small header in JSON that names every tensor,
its data type, its shape, and where its bytes begin and end.

def load(path, device="cuda"):
    header = read_header(path)
    for name, info in header.tensors.items():
        yield name, read_bytes(path, info.start, info.end).to(device)

Numbers matter here: one, two, three, ten, twenty, one hundred, one thousand. A model with eight billion
parameters in bfloat16 needs sixteen gigabytes. A disk that reads two gigabytes per second needs eight
seconds for it; a copy from pinned memory over PCI Express runs at more than fifty gigabytes per second and
needs well under one second. The difference between those two numbers is the whole story.

She opened the old map on the kitchen table. The river ran from the mountains in the north down to the sea
in the south, and the road followed it most of the way. "We leave tomorrow," she said, "before the sun is
up. It is a long way, and the weather will change." He nodded, folded his coat, and went to find the lamp.

Questions people ask: How fast can a model start? Why is the second load faster than the first? What
happens when two models share one card? The answers depend on memory, on caches, and on careful work with
threads, buffers and streams. Measure first, then change one thing, then measure again.
"""


def build_tokenizer(vocab_size: int = VOCAB_TARGET):  # type: ignore[no-untyped-def]
    """Train a byte-level BPE tokenizer on :data:`CORPUS` and wrap it for transformers.

    Args:
        vocab_size: the most tokens to learn (specials and the 256 byte symbols included).

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with eos ``<|endoftext|>``, bos ``<|startoftext|>`` and
        pad ``<|pad|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=SPECIAL_TOKENS[0],
        bos_token=SPECIAL_TOKENS[1],
        pad_token=SPECIAL_TOKENS[2],
        model_max_length=2048,
    )


def qwen3_config(vocab_size: int) -> dict[str, object]:
    """config.json of the default model (written by hand, so it does not change with transformers)."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "use_cache": True,
        "initializer_range": 0.02,
        "dtype": "bfloat16",
        "eos_token_id": 0,
        "bos_token_id": 1,
        "pad_token_id": 2,
    }


def tensor_shapes(vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the default model (tied embeddings: no ``lm_head.weight``), by name."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab_size, HIDDEN),
        "model.norm.weight": (HIDDEN,),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (q, HIDDEN),
            p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, q),
            p + "self_attn.q_norm.weight": (HEAD_DIM,),
            p + "self_attn.k_norm.weight": (HEAD_DIM,),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        }
    return shapes


def random_weights(vocab_size: int, seed: int = SEED):  # type: ignore[no-untyped-def]
    """The default model's weights: tensor ``i`` in name order drawn from a generator seeded ``seed + i``."""
    import torch

    out = {}
    for i, (name, shape) in enumerate(sorted(tensor_shapes(vocab_size).items())):
        gen = torch.Generator().manual_seed(seed + i)
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            # Small next to the layers' outputs, so the layers, not the input token alone, pick the next one.
            t = 0.05 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        out[name] = t.to(torch.bfloat16)
    return out


def _unprintable_ids(tokenizer) -> list[int]:  # type: ignore[no-untyped-def]
    """Tokens that decode to control characters or half of a UTF-8 character."""
    bad = []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        if "\ufffd" in text or not text.replace("\n", "").isprintable():
            bad.append(i)
    return bad


def build_default_model(path: str | Path) -> Path:
    """Write the default model into ``path`` (created if needed); the same bytes every time.

    Args:
        path: the folder to write into.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Example:
        >>> build_default_model("/tmp/tiny")  # doctest: +SKIP
        PosixPath('/tmp/tiny')
    """
    from safetensors.torch import save_file

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    tokenizer.save_pretrained(root)
    (root / "config.json").write_text(json.dumps(qwen3_config(vocab), indent=2, sort_keys=True) + "\n")
    # A random model emits any token; keep it from printing control bytes and half characters.
    generation = {
        "bos_token_id": 1,
        "eos_token_id": 0,
        "pad_token_id": 2,
        "suppress_tokens": _unprintable_ids(tokenizer),
    }
    (root / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    save_file(random_weights(vocab), str(root / "model.safetensors"), metadata={"format": "pt"})
    return root


def ensure_default_model(*, progress: bool = True) -> Path:
    """The store's copy of the default model, built and pulled into the store first if missing.

    Returns:
        The model's folder in the store.

    Raises:
        StoreError: the store could not take the model (disk full, permissions).
    """
    from flashtensors import store

    try:
        return store.resolve_model_path(DEFAULT_MODEL_ID)
    except ModelNotFound:
        pass
    with tempfile.TemporaryDirectory(prefix="flash-default-") as tmp:
        built = build_default_model(Path(tmp) / "tiny-random-qwen3")
        try:
            store.pull(str(built), name=DEFAULT_MODEL_ID, progress=progress)
        except StoreError:
            # Another process stored it first (from its own build folder): theirs is the same model.
            return store.resolve_model_path(DEFAULT_MODEL_ID)
    return store.resolve_model_path(DEFAULT_MODEL_ID)
