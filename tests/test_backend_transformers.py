"""The transformers backend against transformers itself: same logits bit for bit, same greedy and seeded
sampled tokens, no copies on the way, the right Auto class for non-causal models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from flashtensors.backends.generation import SamplingParams
from flashtensors.backends.transformers_backend import load_transformers_model, parse_dtype
from flashtensors.errors import BackendError, ConfigError, ModelNotFound

IDS = torch.tensor([[1, 5, 9, 33, 7, 100, 2, 64]])
DTYPES = [torch.float32, torch.bfloat16]


def _reference(model_dir: Path, dtype: torch.dtype, auto: type = transformers.AutoModelForCausalLM):
    return auto.from_pretrained(model_dir, dtype=dtype).eval()


def _assert_same_logits(model_dir: Path, dtype: torch.dtype) -> None:
    llm = load_transformers_model(model_dir, dtype=dtype, device="cpu")
    ref = _reference(model_dir, dtype)
    with torch.no_grad():
        got, want = llm.model(IDS).logits, ref(IDS).logits
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)
    # Every buffer (rotary inv_freq, ...) is the one from_pretrained computes, with the same dtype.
    ref_buffers = dict(ref.named_buffers())
    for name, buf in llm.model.named_buffers():
        assert buf.dtype == ref_buffers[name].dtype and torch.equal(buf, ref_buffers[name]), name
    assert llm.load_stats.placement == "assigned"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qwen3_tied_sharded_logits_equal(qwen3_dir: Path, dtype: torch.dtype) -> None:
    _assert_same_logits(qwen3_dir, dtype)
    llm = load_transformers_model(qwen3_dir, dtype=dtype, device="cpu")
    assert llm.model.lm_head.weight is llm.model.model.embed_tokens.weight


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_llama_untied_logits_equal(llama_dir: Path, dtype: torch.dtype) -> None:
    _assert_same_logits(llama_dir, dtype)
    llm = load_transformers_model(llama_dir, dtype=dtype, device="cpu")
    assert llm.model.lm_head.weight.data_ptr() != llm.model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(
        llm.model.lm_head.weight, load_file(llama_dir / "model.safetensors")["lm_head.weight"].to(dtype)
    )


def test_llama_tied_logits_equal(llama_tied_dir: Path) -> None:
    _assert_same_logits(llama_tied_dir, torch.bfloat16)


def test_weights_are_used_in_place(qwen3_dir: Path) -> None:
    """Same dtype as the checkpoint: every parameter is a view of the engine's one arena, none a copy."""
    llm = load_transformers_model(qwen3_dir, dtype="bfloat16", device="cpu")
    params = list(llm.model.parameters())
    assert len({p.untyped_storage().data_ptr() for p in params}) == 1
    assert all(not p.is_meta for p in params)
    assert all(p.requires_grad for p in params)  # like from_pretrained: parameters, not frozen tensors
    assert not llm.model.training


def test_dtype_auto_keeps_checkpoint_dtype(llama_dir: Path) -> None:
    llm = load_transformers_model(llama_dir, dtype="auto", device="cpu")
    assert {p.dtype for p in llm.model.parameters()} == {torch.bfloat16}
    assert llm.load_stats.dtype == "bfloat16"


def test_bert_loads_through_automodel(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64,
    )  # fmt: skip
    for cls, auto in ((transformers.BertModel, transformers.AutoModel),
                      (transformers.BertForMaskedLM, transformers.AutoModelForMaskedLM)):  # fmt: skip
        folder = tmp_path / cls.__name__
        cls(config).save_pretrained(folder)
        llm = load_transformers_model(folder, dtype="float32", device="cpu")
        ref = _reference(folder, torch.float32, auto)
        assert type(llm.model) is cls is type(ref)
        ids = torch.tensor([[2, 5, 9, 33, 7]])
        with torch.no_grad():
            got, want = llm.model(ids), ref(ids)
        key = "logits" if cls is transformers.BertForMaskedLM else "last_hidden_state"
        assert torch.equal(got[key], want[key])
        assert llm.load_stats.placement == "assigned"
        with pytest.raises(BackendError, match="does not generate"):
            llm.generate({"prompt_token_ids": [2, 5]})


def _save_tiny_moe(path: Path) -> None:
    """A 2-layer Qwen3-MoE with 4 experts, bf16, random weights: one tensor per expert in the files."""
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    transformers.Qwen3MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(path)


def test_renamed_weights_go_through_transformers_loader(tmp_path: Path) -> None:
    """A mixture-of-experts checkpoint stores one tensor per expert; transformers 5 fuses them on load."""
    _save_tiny_moe(tmp_path)
    llm = load_transformers_model(tmp_path, dtype="bfloat16", device="cpu")
    ref = _reference(tmp_path, torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(llm.model(IDS).logits, ref(IDS).logits)
    assert llm.load_stats.placement == "transformers"


def test_missing_weight_is_initialized_not_left_on_meta(llama_dir: Path, tmp_path: Path) -> None:
    sd = load_file(llama_dir / "model.safetensors")
    del sd["model.norm.weight"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    llm = load_transformers_model(tmp_path, dtype="float32", device="cpu")
    assert torch.equal(llm.model.model.norm.weight, torch.ones(32))  # RMSNorm's own initialization
    assert not any(t.is_meta for t in llm.model.state_dict().values())


def test_shape_mismatch_is_a_backend_error(llama_dir: Path, tmp_path: Path) -> None:
    sd = load_file(llama_dir / "model.safetensors")
    sd["model.norm.weight"] = torch.ones(31, dtype=torch.bfloat16)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(BackendError, match=r"model.norm.weight.*\(31,\).*\(32,\)") as info:
        load_transformers_model(tmp_path, device="cpu")
    assert "flash pull" in info.value.hint


def test_folder_without_config_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="config.json"):
        load_transformers_model(tmp_path, device="cpu")


def test_remote_code_is_not_trusted_by_default(llama_dir: Path, tmp_path: Path) -> None:
    config = json.loads((llama_dir / "config.json").read_text())
    config.update(model_type="my-own-arch", auto_map={"AutoConfig": "configuration_mine.MyConfig"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((llama_dir / "model.safetensors").read_bytes())
    with pytest.raises(BackendError, match="trust_remote_code"):
        load_transformers_model(tmp_path, device="cpu")


def test_parse_dtype() -> None:
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("torch.float16") is torch.float16
    assert parse_dtype("auto") is None and parse_dtype(None) is None
    with pytest.raises(ConfigError, match="int8"):
        parse_dtype("int8")


# ---------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def qwen3_ref(qwen3_dir: Path):
    return _reference(qwen3_dir, torch.float32)


@pytest.fixture(scope="module")
def qwen3_llm(qwen3_dir: Path):
    return load_transformers_model(qwen3_dir, dtype="float32", device="cpu")


def test_greedy_generate_matches_transformers(qwen3_llm, qwen3_ref) -> None:
    prompt = [3, 17, 42, 99, 5]
    out = qwen3_llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=12))
    want = qwen3_ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12)[0, len(prompt) :]
    assert out[0].prompt_token_ids == prompt
    assert out[0].outputs[0].token_ids == want.tolist()
    assert out[0].outputs[0].finish_reason == ("length" if len(want) == 12 else "stop")


def test_seeded_sampling_matches_transformers(qwen3_llm, qwen3_ref) -> None:
    """Any object with vLLM's attribute names works as sampling params; the seed makes it reproducible."""

    class VllmLike:
        temperature, top_p, top_k, max_tokens, seed = 0.7, 0.9, -1, 10, 1234

    prompt = [3, 17, 42]
    out = qwen3_llm.generate([{"prompt_token_ids": prompt}] * 2, VllmLike())
    torch.manual_seed(1234)
    want = qwen3_ref.generate(
        torch.tensor([prompt]), do_sample=True, temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=10
    )
    assert out[0].outputs[0].token_ids == want[0, len(prompt) :].tolist()
    assert out[1].outputs[0].token_ids == out[0].outputs[0].token_ids
    assert [o.request_id for o in out] == ["0", "1"]


def test_keyword_overrides_and_bad_options(qwen3_llm) -> None:
    out = qwen3_llm.generate(
        {"prompt_token_ids": [3, 4]}, SamplingParams(max_tokens=50), temperature=0, max_tokens=3
    )
    assert len(out[0].outputs[0].token_ids) == 3
    with pytest.raises(BackendError, match="top_p"):
        qwen3_llm.generate({"prompt_token_ids": [3]}, top_p=0.0)
    with pytest.raises(BackendError, match="max_tokens"):
        qwen3_llm.generate({"prompt_token_ids": [3]}, max_tokens=0)


def test_text_prompt_without_tokenizer_is_explained(qwen3_llm) -> None:
    assert qwen3_llm.tokenizer is None  # the fixture folder holds weights and config only
    with pytest.raises(BackendError, match="no tokenizer") as info:
        qwen3_llm.generate("hello")
    assert "prompt_token_ids" in info.value.hint


# ---------------------------------------------------------------- on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("fixture", ["qwen3_dir", "llama_dir"])
def test_cuda_logits_equal_and_in_place(request: pytest.FixtureRequest, fixture: str) -> None:
    folder = request.getfixturevalue(fixture)
    llm = load_transformers_model(folder, dtype="bfloat16", device="cuda")
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda")
    ids = IDS.cuda()
    with torch.no_grad():
        assert torch.equal(llm.model(ids).logits, ref(ids).logits)
    tensors = [*llm.model.parameters(), *llm.model.buffers()]
    assert all(t.device.type == "cuda" for t in tensors)
    assert len({p.untyped_storage().data_ptr() for p in llm.model.parameters()}) == 1
    out = llm.generate({"prompt_token_ids": [3, 17, 42]}, temperature=0, max_tokens=6)
    want = ref.generate(torch.tensor([[3, 17, 42]], device="cuda"), do_sample=False, max_new_tokens=6)
    assert out[0].outputs[0].token_ids == want[0, 3:].tolist()


@pytest.mark.gpu
def test_cuda_renamed_weights(tmp_path: Path) -> None:
    _save_tiny_moe(tmp_path)
    llm = load_transformers_model(tmp_path, dtype="bfloat16", device="cuda")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cuda")
    with torch.no_grad():
        assert torch.equal(llm.model(IDS.cuda()).logits, ref(IDS.cuda()).logits)
    assert all(p.device.type == "cuda" for p in llm.model.parameters())


def test_tied_checkpoint_holding_only_lm_head(llama_tied_dir: Path, tmp_path: Path) -> None:
    """Some tied checkpoints store lm_head.weight instead of the embedding; both end up that tensor."""
    sd = load_file(llama_tied_dir / "model.safetensors")
    sd["lm_head.weight"] = sd.pop("model.embed_tokens.weight")
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((llama_tied_dir / "config.json").read_text())
    llm = load_transformers_model(tmp_path, dtype="bfloat16", device="cpu")
    ref = _reference(llama_tied_dir, torch.bfloat16)
    assert llm.model.model.embed_tokens.weight is llm.model.lm_head.weight
    with torch.no_grad():
        assert torch.equal(llm.model(IDS).logits, ref(IDS).logits)


@pytest.mark.gpu
def test_cuda_model_comes_back_with_the_page_cache_unpinned(qwen3_dir: Path) -> None:
    """The warm path unpins in the background; a model must not come back while that still runs (it
    holds the driver's lock and slowed the first generate by ~0.4 s on an 8B shape)."""
    import threading

    import flashtensors as ft
    from flashtensors.engine import pinned_mmap

    ft.configure(warm_ring_threads=0)  # all pinned (on a small file the ring could take everything)
    llm = load_transformers_model(qwen3_dir, dtype="bfloat16", device="cuda", read_path="pinned-mmap")
    assert any("pinned-mmap" in p for p in llm.load_stats.paths.values())
    assert not pinned_mmap._releases
    assert not [t for t in threading.enumerate() if t.name == "flash-unpin" and t.is_alive()]


@pytest.mark.gpu
def test_cuda_cached_weights_are_not_pinned_in_place(qwen3_dir: Path) -> None:
    """load_model reads a cached checkpoint through the staging ring: unpinning the page cache afterwards
    would hold the driver's lock while the first generate runs."""
    from flashtensors.engine import pinned_mmap

    for f in qwen3_dir.glob("*.safetensors"):
        f.read_bytes()
    llm = load_transformers_model(qwen3_dir, dtype="bfloat16", device="cuda")
    assert set(llm.load_stats.paths.values()) == {"buffered"}
    assert not pinned_mmap._releases
    auto = transformers.AutoModelForCausalLM
    ref = auto.from_pretrained(qwen3_dir, dtype=torch.bfloat16, device_map="cuda")
    with torch.no_grad():
        assert torch.equal(llm.model(IDS.cuda()).logits, ref(IDS.cuda()).logits)
