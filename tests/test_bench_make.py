"""`flash bench make`: synthetic Qwen3 checkpoints that safetensors and transformers accept, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from flashtensors.bench.make import make_checkpoint
from flashtensors.bench.shapes import SHAPES, resolve_shape
from flashtensors.cli.app import main
from flashtensors.errors import ConfigError, StoreError
from helpers.benchckpt import TINY, make_tiny

# BENCH.md's table: bf16 bytes in GB and tied embeddings.
BENCH_TABLE = {
    "qwen3-0.6b": (1.19, True),
    "qwen3-4b": (8.04, True),
    "qwen3-8b": (16.4, False),
    "qwen3-14b": (29.5, False),
    "qwen3-32b": (65.5, False),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer custom checkpoint in several shards."""
    return make_tiny(tmp_path_factory, "bench", seed=7)


def _file_tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                assert name not in out, f"{name} stored twice"
                out[name] = st.get_tensor(name)
    return out


@pytest.mark.parametrize("name", list(BENCH_TABLE))
def test_shapes_match_the_bench_table(name: str) -> None:
    gb, tied = BENCH_TABLE[name]
    shape = SHAPES[name]
    assert round(shape.numel() * 2 / 1e9, 1 if gb >= 10 else 2) == gb
    assert shape.tied is tied
    names = [n for n, _ in shape.tensors()]
    assert len(names) == len(set(names)) == 2 + 11 * shape.layers + (0 if tied else 1)


def test_checkpoint_is_sharded_indexed_and_readable(tiny: Path) -> None:
    shards = sorted(tiny.glob("*.safetensors"))
    assert len(shards) > 1
    assert [p.name for p in shards] == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    tensors = _file_tensors(tiny)
    shape = resolve_shape("custom", **TINY)
    assert set(index["weight_map"]) == set(tensors) == {n for n, _ in shape.tensors()}
    for name, file in index["weight_map"].items():
        with safe_open(str(tiny / file), "pt") as st:
            assert name in st.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, dims in shape.tensors():
        t = tensors[name]
        assert t.dtype == torch.bfloat16 and tuple(t.shape) == dims
        assert torch.isfinite(t.float()).all()
        assert 0 < t.float().abs().max() < 1
    digests = {t.view(torch.uint8).numpy().tobytes() for n, t in tensors.items() if t.dim() == 2}
    assert len(digests) == sum(1 for t in tensors.values() if t.dim() == 2), "two tensors hold the same bytes"
    assert not list(tiny.glob(".*tmp*")), "temporary files left behind"


def test_transformers_loads_it_bit_for_bit_and_generates(tiny: Path) -> None:
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(str(tiny))
    assert model.config.num_hidden_layers == 2 and model.config.tie_word_embeddings is False
    state = model.state_dict()
    for name, t in _file_tensors(tiny).items():
        assert state[name].dtype == t.dtype
        assert torch.equal(state[name].view(torch.uint8), t.view(torch.uint8)), name
    tok = AutoTokenizer.from_pretrained(str(tiny))
    ids = tok("Hello, world", return_tensors="pt")
    assert max(ids["input_ids"][0].tolist()) < model.config.vocab_size
    out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert out.shape[-1] == ids["input_ids"].shape[-1] + 2
    generation = json.loads((tiny / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.eos_token_id


def test_same_seed_same_bytes_other_seed_other_bytes(tiny: Path, tmp_path: Path) -> None:
    shape = resolve_shape("custom", **TINY)
    make_checkpoint(shape, tmp_path / "same", shard_size=16 * 1024, seed=7)
    make_checkpoint(shape, tmp_path / "other", shard_size=16 * 1024, seed=8)
    for shard in sorted(tiny.glob("*.safetensors")):
        assert (tmp_path / "same" / shard.name).read_bytes() == shard.read_bytes()
        assert (tmp_path / "other" / shard.name).read_bytes() != shard.read_bytes()


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("fp16", torch.float16), ("fp32", torch.float32)])
def test_other_dtypes(tmp_path: Path, dtype: str, torch_dtype: torch.dtype) -> None:
    made = make_checkpoint(resolve_shape("custom", **TINY), tmp_path, dtype=dtype)
    tensors = _file_tensors(tmp_path)
    assert {t.dtype for t in tensors.values()} == {torch_dtype}
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert made.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == str(torch_dtype).split(".")[1]


def test_refuses_a_non_empty_directory_unless_forced(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    shape = resolve_shape("custom", **TINY)
    with pytest.raises(StoreError, match="not empty") as info:
        make_checkpoint(shape, tmp_path)
    assert "--force" in info.value.hint
    make_checkpoint(shape, tmp_path, force=True, shard_size=16 * 1024)
    make_checkpoint(shape, tmp_path, force=True)  # fewer shards now: the old ones must go
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model-00001-of-00001.safetensors"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_bad_shapes_are_refused_with_a_hint() -> None:
    with pytest.raises(ConfigError, match="unknown shape") as info:
        resolve_shape("qwen3-7b")
    assert "flash bench make --help" in info.value.hint
    with pytest.raises(ConfigError, match="multiple of kv_heads"):
        resolve_shape("custom", heads=3, kv_heads=2)
    with pytest.raises(ConfigError, match="vocab must be at least"):
        make_checkpoint(resolve_shape("custom", vocab=100), "/nonexistent/never-written")


def test_cli_make(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "cli"
    code = main(["bench", "make", "custom", str(target), "--layers", "1", "--hidden", "32", "--tied"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith(f"wrote {target}: custom, ") and "1 files" in out
    config = json.loads((target / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["hidden_size"] == 32 and config["tie_word_embeddings"]
    assert "lm_head.weight" not in _file_tensors(target)
    code = main(["bench", "make", "qwen3-9b", str(tmp_path / "x")])
    _, err = capsys.readouterr()
    assert code == 1 and err.startswith("Error: unknown shape") and "hint:" in err
