"""Shared fixtures: settings isolation, the ``gpu`` marker, and tiny deterministic checkpoints.

Every checkpoint here is built by the tests themselves (random bytes with fixed seeds, or a transformers
model with a fixed seed and a tiny config), once per session, so the suite never touches the network.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# Make ``helpers`` importable whatever import mode pytest runs in.
sys.path.insert(0, str(Path(__file__).parent))

from flashtensors.config import reset_settings as _reset_settings  # noqa: E402
from helpers.stfile import Spec, build, random_spec, write  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``@pytest.mark.gpu`` tests where CUDA is missing (torch is only imported if one exists)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the lent GPU machine)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def reset_settings(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Each test starts from default settings, with a store of its own (never the user's real one)."""
    monkeypatch.setenv("FLASH_HOME", str(tmp_path_factory.mktemp("flash_home")))
    _reset_settings()
    yield
    _reset_settings()


# ---------------------------------------------------------------- checkpoints built from raw bytes

ALL_DTYPES = (
    "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
)  # fmt: skip


def dtype_specs() -> list[Spec]:
    """One tensor of every dtype in three shapes: a matrix, a scalar and an empty tensor."""
    specs: list[Spec] = []
    for i, dt in enumerate(ALL_DTYPES):
        specs.append(random_spec(f"m.{dt.lower()}", dt, (3, 5), seed=100 + i))
        specs.append(random_spec(f"s.{dt.lower()}", dt, (), seed=200 + i))
        specs.append(random_spec(f"e.{dt.lower()}", dt, (4, 0, 2), seed=300 + i))
    return specs


def misaligned_specs() -> list[Spec]:
    """A 3-byte U8 first, so every wider tensor after it starts on an odd offset."""
    return [
        random_spec("head.u8", "U8", (3,), seed=1),
        random_spec("w.bf16", "BF16", (7, 9), seed=2),
        random_spec("w.f32", "F32", (5, 3), seed=3),
        random_spec("odd.u8", "U8", (5,), seed=4),
        random_spec("w.f64", "F64", (4,), seed=5),
        random_spec("w.i64", "I64", (2, 3), seed=6),
        random_spec("w.c64", "C64", (3,), seed=7),
        random_spec("tail.i16", "I16", (11,), seed=8),
    ]


def ring_specs() -> list[Spec]:
    """~3 MB: tensors larger than a 256 KiB ring, tensors straddling 64 KiB chunks, odd offsets."""
    specs = [
        random_spec("big.f32", "F32", (256, 1024), seed=11),  # 1 MiB, four rings' worth
        random_spec("pad.u8", "U8", (1,), seed=12),
        random_spec("mid.bf16", "BF16", (333, 1025), seed=13),  # ~666 KB at an odd offset
    ]
    for i in range(40):
        specs.append(random_spec(f"small.{i:02d}", "F16" if i % 2 else "U8", (97 + 31 * i,), seed=20 + i))
    specs.append(random_spec("big2.f64", "F64", (131_071,), seed=99))  # ~1 MB, ends off any chunk edge
    return specs


@pytest.fixture(scope="session")
def all_dtypes_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every dtype, written by the reference writer (safetensors orders and pads it itself)."""
    from safetensors.torch import save_file

    from helpers.stfile import expected_tensors

    path = tmp_path_factory.mktemp("dtypes") / "all_dtypes.safetensors"
    save_file(expected_tensors(dtype_specs()), str(path), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="session", params=[None, 1, 3], ids=["pad8", "start1", "start3"])
def misaligned_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Misaligned tensors; the byte buffer itself starts on an 8-aligned, or a 1 or 3 mod 8, offset."""
    path = tmp_path_factory.mktemp("misaligned") / f"misaligned_{request.param}.safetensors"
    return write(path, build(misaligned_specs(), data_start_mod8=request.param))


@pytest.fixture(scope="session")
def ring_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ring") / "ring.safetensors"
    return write(path, build(ring_specs(), data_start_mod8=5))


def _shard_specs(n_shards: int, per_shard: int, seed: int) -> list[list[Spec]]:
    dts = ("BF16", "F32", "F16", "I64", "U8")
    return [
        [
            random_spec(f"layers.{s}.w{j}", dts[(s + j) % len(dts)], (17 + s, 9 + j), seed=seed + 100 * s + j)
            for j in range(per_shard)
        ]
        for s in range(n_shards)
    ]


@pytest.fixture(scope="session")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF-style sharded checkpoint: 4 shards + model.safetensors.index.json + config.json."""
    root = tmp_path_factory.mktemp("index_ckpt")
    shards = _shard_specs(4, 5, seed=1000)
    weight_map = {}
    for i, specs in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write(root / fname, build(specs, {"format": "pt"}))
        weight_map.update({s.name: fname for s in specs})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    (root / "config.json").write_text("{}")
    return root


@pytest.fixture(scope="session")
def plain_shards_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of three *.safetensors files and no index (plus a non-weight file to ignore)."""
    root = tmp_path_factory.mktemp("plain_ckpt")
    for i, specs in enumerate(_shard_specs(3, 4, seed=5000)):
        write(root / f"part{i}.safetensors", build(specs))
    (root / "README.md").write_text("not weights\n")
    return root


def _save_tiny_model(root: Path, arch: str, tie: bool, shard: str | None) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    common = dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )  # fmt: skip
    if arch == "qwen3":
        config = transformers.Qwen3Config(head_dim=8, **common)
        model = transformers.Qwen3ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(config)
    model = model.to(torch.bfloat16).eval()
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(root, safe_serialization=True, **kwargs)
    return root


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3ForCausalLM, tied embeddings, bf16, saved in several shards with an index."""
    return _save_tiny_model(tmp_path_factory.mktemp("qwen3"), "qwen3", tie=True, shard="20KB")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LlamaForCausalLM, untied lm_head, bf16, one file."""
    return _save_tiny_model(tmp_path_factory.mktemp("llama"), "llama", tie=False, shard=None)


@pytest.fixture(scope="session")
def llama_tied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LlamaForCausalLM with tie_word_embeddings: lm_head is not stored, embed_tokens is."""
    return _save_tiny_model(tmp_path_factory.mktemp("llama_tied"), "llama", tie=True, shard=None)
