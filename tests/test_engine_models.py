"""Real architectures built by transformers (tiny configs, random weights): the engine's state dict is the
reference's, and a model fed with it computes exactly what transformers' own loading computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flashtensors.engine.api import iter_tensors, load_file, load_state_dict
from helpers.compare import assert_same, reference_load

PATHS = ["buffered", "direct", "pinned-mmap", "auto"]


@pytest.mark.parametrize("read_path", PATHS)
def test_qwen3_sharded(qwen3_dir: Path, read_path: str) -> None:
    assert (qwen3_dir / "model.safetensors.index.json").exists()
    assert len(list(qwen3_dir.glob("*.safetensors"))) > 1
    assert_same(load_state_dict(qwen3_dir, read_path=read_path), reference_load(qwen3_dir))


def test_llama_single_file(llama_dir: Path) -> None:
    path = llama_dir / "model.safetensors"
    assert_same(load_file(path), reference_load(path))
    assert "lm_head.weight" in load_file(path)


def test_tied_embeddings_stored_once(llama_tied_dir: Path) -> None:
    """save_pretrained drops the tied lm_head; the engine returns what the file holds, like safetensors."""
    sd = load_state_dict(llama_tied_dir)
    assert_same(sd, reference_load(llama_tied_dir))
    assert "model.embed_tokens.weight" in sd and "lm_head.weight" not in sd


def test_cast_real_model(qwen3_dir: Path) -> None:
    ref = {k: v.to(torch.float32) for k, v in reference_load(qwen3_dir).items()}
    assert_same(load_state_dict(qwen3_dir, dtype=torch.float32), ref)
    assert_same(dict(iter_tensors(qwen3_dir, dtype=torch.float32)), ref)


@pytest.mark.parametrize("fixture", ["qwen3_dir", "llama_tied_dir", "llama_dir"])
def test_model_from_engine_state_dict_matches_from_pretrained(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    """Feed the engine's tensors to a freshly initialised model and compare its logits with those of
    transformers' from_pretrained on the same folder (the tied lm_head included)."""
    import transformers

    root: Path = request.getfixturevalue(fixture)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(root, dtype=torch.bfloat16).eval()
    config = transformers.AutoConfig.from_pretrained(root)
    torch.manual_seed(1234)  # different weights from the saved ones, so a skipped tensor shows
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    missing, unexpected = model.load_state_dict(load_state_dict(root), strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set())
    model.tie_weights()
    ids = torch.tensor([[1, 5, 9, 77, 3, 120]])
    with torch.no_grad():
        want = ref_model(ids).logits
        got = model(ids).logits
    assert torch.equal(got, want)
