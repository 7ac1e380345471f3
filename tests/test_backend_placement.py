"""What load_model does beside the engine: reading the headers, building on meta, assigning the tensors,
and the warm-up run while the weights are read. Each is checked against transformers' own result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from flashtensors.backends import placement, warmup
from flashtensors.backends.transformers_backend import auto_class_for, load_transformers_model
from flashtensors.engine import api as engine
from flashtensors.errors import BackendError

IDS = torch.tensor([[1, 5, 9, 33, 7, 100, 2, 64]])


@pytest.fixture
def fresh_warmups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget which shapes this process has warmed up, so that a warm-up really runs."""
    monkeypatch.setattr(warmup, "_done", set())


def _meta_model(model_dir: Path, dtype: torch.dtype = torch.bfloat16):
    config = transformers.AutoConfig.from_pretrained(model_dir)
    return placement.build_on_meta(auto_class_for(config), config, dtype, trust_remote_code=False)


def test_layout_is_what_the_engine_reads(qwen3_dir: Path) -> None:
    layout = placement.read_layout(qwen3_dir)
    tensors = engine.load(qwen3_dir).tensors
    assert list(layout.tensors) == list(tensors)
    assert layout.tensors == {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
    assert layout.first_float_dtype == torch.bfloat16


def test_auto_dtype_without_a_config_dtype_takes_the_checkpoint_one(llama_dir: Path, tmp_path: Path) -> None:
    config = json.loads((llama_dir / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        config.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((llama_dir / "model.safetensors").read_bytes())
    llm = load_transformers_model(tmp_path, dtype="auto", device="cpu")
    assert llm.load_stats.dtype == "bfloat16"
    assert {p.dtype for p in llm.model.parameters()} == {torch.bfloat16}


def test_build_on_meta_skips_initializers_on_meta_only(llama_dir: Path) -> None:
    before = torch.random.get_rng_state()
    model = _meta_model(llama_dir)
    assert torch.equal(before, torch.random.get_rng_state())  # no initializer drew random numbers
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    real = torch.zeros(3)
    with placement._SkipInitOnMeta():
        torch.nn.init.constant_(real, 2.0)
        real.add_(1.0)
    assert torch.equal(real, torch.full((3,), 3.0))  # tensors with storage are initialized as usual


def _assigned(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    return {k: out[k] for k in tensors}


def test_assignment_matches_load_state_dict(llama_dir: Path) -> None:
    """The direct assignment ends where load_state_dict(assign=True) does: the same tensors, in place,
    as Parameters of the same requires_grad, flagged as initialized for transformers."""
    tensors = load_file(llama_dir / "model.safetensors")
    fast, slow = _meta_model(llama_dir), _meta_model(llama_dir)
    slots = placement._slots(fast, list(tensors))
    assert slots is not None
    placement._assign(fast, tensors, slots)
    slow.load_state_dict(tensors, strict=False, assign=True)
    got, want = _assigned(fast, tensors), _assigned(slow, tensors)
    for key, source in tensors.items():
        assert type(got[key]) is type(want[key]), key
        assert got[key].requires_grad == want[key].requires_grad, key
        assert got[key].data_ptr() == source.data_ptr() == want[key].data_ptr(), key
        assert got[key]._is_hf_initialized, key


def test_models_hooking_into_loading_get_load_state_dict(llama_dir: Path) -> None:
    tensors = load_file(llama_dir / "model.safetensors")
    model = _meta_model(llama_dir)
    seen: list[str] = []
    model.model.norm.register_load_state_dict_pre_hook(lambda module, sd, prefix, *a: seen.append(prefix))
    assert placement._slots(model, list(tensors)) is None
    placement._assign(model, tensors, None)
    assert seen == ["model.norm."]
    assert model.model.norm.weight.data_ptr() == tensors["model.norm.weight"].data_ptr()
    assert model.model.norm.weight._is_hf_initialized


def test_place_refuses_tensors_the_headers_did_not_announce(llama_dir: Path) -> None:
    model = _meta_model(llama_dir)
    prepared = placement.prepare(model, placement.read_layout(llama_dir), torch.bfloat16, torch.device("cpu"))
    assert prepared is not None
    tensors = load_file(llama_dir / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(31, dtype=torch.bfloat16)
    with pytest.raises(BackendError, match="changed while"):
        placement.place(prepared, tensors)


# ---------------------------------------------------------------- the warm-up


def test_small_config_keeps_each_layer_type_once() -> None:
    config = transformers.Qwen3Config(
        vocab_size=5000, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=4000, use_sliding_window=True, sliding_window=16,
        max_window_layers=2,
    )  # fmt: skip
    small = warmup.small_config(config)
    assert len(set(config.layer_types)) == 2
    assert small.layer_types == list(dict.fromkeys(config.layer_types)) and small.num_hidden_layers == 2
    assert small.vocab_size == 1024 and small.pad_token_id is None and small.hidden_size == 32
    assert config.num_hidden_layers == 4 and config.vocab_size == 5000  # the real config is untouched
    assert warmup.small_config(transformers.LlavaConfig()) is None  # composite models are left alone


def test_warm_up_runs_once_and_leaves_the_generators(llama_dir: Path, fresh_warmups: None) -> None:
    config = transformers.AutoConfig.from_pretrained(llama_dir)
    auto = auto_class_for(config)
    torch.manual_seed(3)
    before = torch.random.get_rng_state()
    seconds = warmup.warm_up(auto, config, torch.bfloat16, torch.device("cpu"))
    assert seconds is not None and seconds > 0
    assert torch.equal(before, torch.random.get_rng_state())  # sampling drew from a forked generator
    assert warmup.warm_up(auto, config, torch.bfloat16, torch.device("cpu")) is None  # once per shape


def test_warm_up_failure_is_not_a_load_failure(
    llama_dir: Path, fresh_warmups: None, caplog: pytest.LogCaptureFixture
) -> None:
    config = transformers.AutoConfig.from_pretrained(llama_dir)
    config.hidden_act = "no-such-activation"  # the small copy cannot be built; the real model is not ours
    with caplog.at_level("DEBUG", logger=warmup.__name__):
        assert warmup.warm_up(auto_class_for(config), config, torch.float32, torch.device("cpu")) is None
    assert "GPU warm-up skipped: KeyError" in caplog.text


def test_load_with_warm_up_equals_from_pretrained(
    llama_dir: Path, tmp_path: Path, fresh_warmups: None
) -> None:
    """A weight missing from the checkpoint is drawn at random, after the warm-up sampled: the real model
    must still get what from_pretrained draws with the same seed."""
    sd = load_file(llama_dir / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    torch.manual_seed(7)
    llm = load_transformers_model(tmp_path, dtype="float32", device="cpu", warmup=True)
    torch.manual_seed(7)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert llm.load_stats.warmup_seconds is not None
    down = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(llm.model.get_parameter(down), ref.get_parameter(down))
    with torch.no_grad():
        assert torch.equal(llm.model(IDS).logits, ref(IDS).logits)


def test_warm_up_is_off_by_default(llama_dir: Path, fresh_warmups: None) -> None:
    assert load_transformers_model(llama_dir, device="cpu").load_stats.warmup_seconds is None
    assert load_transformers_model(llama_dir, device="cpu", warmup=False).load_stats.warmup_seconds is None


@pytest.mark.gpu
def test_cuda_warm_up_keeps_logits_equal(qwen3_dir: Path, fresh_warmups: None) -> None:
    llm = load_transformers_model(qwen3_dir, dtype="bfloat16", device="cuda", warmup=True)
    assert llm.load_stats.warmup_seconds is not None
    auto = transformers.AutoModelForCausalLM
    ref = auto.from_pretrained(qwen3_dir, dtype=torch.bfloat16, device_map="cuda")
    ids = IDS.cuda()
    with torch.no_grad():
        assert torch.equal(llm.model(ids).logits, ref(ids).logits)
    out = llm.generate({"prompt_token_ids": [3, 17, 42]}, temperature=0, max_tokens=6)
    want = ref.generate(torch.tensor([[3, 17, 42]], device="cuda"), do_sample=False, max_new_tokens=6)
    assert out[0].outputs[0].token_ids == want[0, 3:].tolist()
