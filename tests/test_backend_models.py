"""``ft.load_model``, the backend registry, and the built-in default model (offline, deterministic)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import flashtensors as ft
from flashtensors import backends, demo, store
from flashtensors.backends import Backend, backend_names, get_backend, register_backend
from flashtensors.backends.generation import FlashModel, Pending, SamplingParams
from flashtensors.errors import BackendError, ModelNotFound


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.build_default_model(tmp_path_factory.mktemp("default") / "tiny-random-qwen3")


@pytest.fixture
def no_pull(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record hub pulls and refuse them (these tests must never reach the network); folders pull as usual."""
    calls: list[str] = []
    real_pull = store.pull

    def local_only(source: str, **kwargs: Any) -> Any:
        if Path(source).is_dir():
            return real_pull(source, **kwargs)
        calls.append(source)
        raise AssertionError(f"unexpected pull of {source}")

    monkeypatch.setattr(store, "pull", local_only)
    return calls


# ---------------------------------------------------------------- registry


def test_unknown_backend_lists_valid_ones(llama_dir: Path, no_pull: list[str]) -> None:
    with pytest.raises(
        BackendError, match=r"unknown backend 'pytorch'; valid backends: .*transformers"
    ) as info:
        ft.load_model("org/not-pulled", backend="pytorch")
    assert "transformers" in info.value.hint
    assert no_pull == []  # the typo is caught before anything is fetched


def test_vllm_says_it_is_not_built_before_anything_is_pulled(no_pull: list[str]) -> None:
    with pytest.raises(BackendError, match="vLLM backend .* is not built yet") as info:
        ft.load_model(model_id="Qwen/Qwen3-0.6B", backend="vllm", dtype="bfloat16")
    assert 'backend="transformers"' in info.value.hint
    assert no_pull == []
    with pytest.raises(BackendError, match="not built yet"):
        ft.activate_vllm_integration()


def test_registry_is_extensible(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    seen: dict[str, Any] = {}

    @register_backend("echo")
    class Echo(Backend):
        def load(self, model_dir: Path, dtype: str | None, device: str | None, **kwargs: Any) -> Any:
            seen.update(model_dir=model_dir, dtype=dtype, device=device, **kwargs)
            return "loaded"

    assert "echo" in backend_names() and isinstance(get_backend("echo"), Echo)
    assert ft.load_model(llama_dir, backend="echo", dtype="float16", device="cpu", flavour="x") == "loaded"
    assert seen == {"model_dir": llama_dir.resolve(), "dtype": "float16", "device": "cpu", "flavour": "x"}

    register_backend("lazy", "flashtensors.backends.transformers_backend:TransformersBackend")
    assert type(get_backend("lazy")).__name__ == "TransformersBackend"
    register_backend("broken", "no_such_package_xyz.backend:Thing")
    with pytest.raises(BackendError, match="no_such_package_xyz") as info:
        get_backend("broken")
    assert "pip install" in info.value.hint


def test_transformers_backend_rejects_unknown_options(llama_dir: Path) -> None:
    with pytest.raises(BackendError, match="flavour"):
        ft.load_model(llama_dir, device="cpu", flavour="x")


# ---------------------------------------------------------------- resolving model ids


def test_folder_path_loads_directly(llama_dir: Path, no_pull: list[str]) -> None:
    llm = ft.load_model(str(llama_dir), backend="transformers", dtype="float32", device="cpu")
    assert isinstance(llm, FlashModel) and llm.model_dir == llama_dir.resolve()
    assert llm.load_stats.nbytes == (llama_dir / "model.safetensors").stat().st_size
    assert llm.load_stats.gbps > 0 and llm.load_stats.device == "cpu"


def test_missing_folder_and_missing_bare_name(tmp_path: Path, no_pull: list[str]) -> None:
    with pytest.raises(ModelNotFound, match="no model folder"):
        ft.load_model(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(ModelNotFound, match="not-here"):
        ft.load_model("not-here", device="cpu")
    assert no_pull == []  # a bare name is never sent to the hub


def test_store_id_is_pulled_when_missing(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`load_model("org/name")` pulls a missing model once; the stand-in pull stores a local folder."""
    real_pull = store.pull
    calls: list[str] = []

    def fake_hub_pull(source: str, **kwargs: Any) -> Any:
        calls.append(source)
        return real_pull(str(llama_dir), name=source, progress=False)

    monkeypatch.setattr(store, "pull", fake_hub_pull)
    first = ft.load_model("acme/tiny-llama", dtype="float32", device="cpu")
    second = ft.load_model("acme/tiny-llama", dtype="float32", device="cpu")
    assert calls == ["acme/tiny-llama"]
    assert first.model_dir == second.model_dir == store.resolve_model_path("acme/tiny-llama")
    with torch.no_grad():
        ids = torch.tensor([[1, 2, 3]])
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)


# ---------------------------------------------------------------- the default model


def _digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def test_default_model_is_deterministic(default_dir: Path, tmp_path: Path) -> None:
    again = demo.build_default_model(tmp_path / "again")
    assert _digests(again) == _digests(default_dir)
    names = set(_digests(default_dir))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names


def test_default_model_is_a_real_qwen3_with_a_working_tokenizer(default_dir: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(default_dir)
    text = "Model weights live on disk; naïve café ✓ 42"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: any text survives
    assert len(tok("the weights of the model")["input_ids"]) < len("the weights of the model") / 2
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (0, 1, 2)
    config = transformers.AutoConfig.from_pretrained(default_dir)
    assert config.architectures == ["Qwen3ForCausalLM"] and config.tie_word_embeddings
    assert config.vocab_size == len(tok)


def test_default_model_generates_like_transformers(default_dir: Path) -> None:
    llm = ft.load_model(default_dir, dtype="bfloat16", device="cpu")
    ref = transformers.AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.bfloat16)
    prompt = "The cat walked along"
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8))
    ids = llm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    want = ref.generate(ids, do_sample=False, max_new_tokens=8)[0, ids.shape[1] :]
    assert out[0].outputs[0].token_ids == want.tolist()
    assert out[0].text == out[0].outputs[0].text == llm.tokenizer.decode(want, skip_special_tokens=True)
    assert out[0].text.strip() and out[0].prompt == prompt

    stream = llm.stream(prompt, temperature=0, max_tokens=8)
    assert "".join(stream) == out[0].text
    assert stream.stats.generated_tokens == len(want) and stream.stats.prompt_tokens == ids.shape[1]
    assert stream.stats.tokens_per_second > 0


def test_leaving_a_stream_early_ends_its_generation(default_dir: Path) -> None:
    llm = ft.load_model(default_dir, device="cpu")
    stream = llm.stream("Once upon", SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    for _piece in stream:
        break
    assert 1 <= stream.stats.generated_tokens < 200


def test_stop_string_cuts_the_completion(default_dir: Path) -> None:
    llm = ft.load_model(default_dir, device="cpu")
    full = llm.generate("Once upon", temperature=0, max_tokens=10)[0].outputs[0]
    stop = full.text.strip()[2:5]
    cut = llm.generate("Once upon", SamplingParams(temperature=0, max_tokens=10, stop=[stop]))[0].outputs[0]
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop"


def test_default_id_is_built_and_stored_once(monkeypatch: pytest.MonkeyPatch, no_pull: list[str]) -> None:
    first = demo.ensure_default_model(progress=False)
    assert first == store.resolve_model_path(demo.DEFAULT_MODEL_ID)

    def fail(path: Any) -> Path:
        raise AssertionError("the stored default model was built again")

    monkeypatch.setattr(demo, "build_default_model", fail)
    llm = ft.load_model(demo.DEFAULT_MODEL_ID, device="cpu", progress=False)
    assert llm.model_dir == first and llm.tokenizer is not None
    assert no_pull == []


# ---------------------------------------------------------------- the tokenizer, loaded in the background


def _new_threads(before: set[threading.Thread], prefix: str = "flash-") -> list[threading.Thread]:
    """Our threads still alive that were not before (another test's may be ending on its own)."""
    return [t for t in threading.enumerate() if t.name.startswith(prefix) and t not in before]


def test_background_tokenizer_is_transformers_own(default_dir: Path) -> None:
    """load_model returns before the tokenizer is read; `.tokenizer` waits for it, and it is the same
    tokenizer AutoTokenizer gives, so text prompts encode and decode exactly as with transformers."""
    before = set(threading.enumerate())
    llm = ft.load_model(default_dir, dtype="bfloat16", device="cpu")
    assert isinstance(llm._tokenizer, Pending)  # still loading (or loaded) on its own thread
    want = transformers.AutoTokenizer.from_pretrained(default_dir)
    got = llm.tokenizer
    assert type(got) is type(want) and got is llm.tokenizer  # loaded once
    text = "Weights, tokens — and a café ✓"
    assert got(text)["input_ids"] == want(text)["input_ids"]
    ids = want(text)["input_ids"]
    by_text = llm.generate(text, temperature=0, max_tokens=5)[0]
    by_ids = llm.generate({"prompt_token_ids": ids}, temperature=0, max_tokens=5)[0]
    assert by_text.prompt_token_ids == ids and by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_text.text == want.decode(by_ids.outputs[0].token_ids, skip_special_tokens=True)
    assert _new_threads(before) == []  # joined once its result was taken


def test_background_tokenizer_threads_do_not_pile_up(default_dir: Path) -> None:
    before = set(threading.enumerate())
    models = [ft.load_model(default_dir, device="cpu") for _ in range(3)]
    for llm in models:
        assert llm.tokenizer is not None
    assert _new_threads(before) == []  # neither tokenizer nor engine (flash-load) threads are left


def test_no_tokenizer_files_means_no_thread(llama_dir: Path) -> None:
    llm = ft.load_model(llama_dir, device="cpu")
    assert llm._tokenizer is None and llm.tokenizer is None


def test_background_tokenizer_errors_surface_on_use(
    default_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    before = set(threading.enumerate())
    llm = ft.load_model(default_dir, device="cpu")  # the model itself loads and runs
    with torch.no_grad():
        assert llm.model(torch.tensor([[5, 6]])).logits.shape[:2] == (1, 2)
    with pytest.raises(RuntimeError, match="exploded"):
        llm.generate("hello")
    with pytest.raises(RuntimeError, match="exploded"):  # every use says so, not only the first
        _ = llm.tokenizer
    assert _new_threads(before) == []


def test_unreadable_tokenizer_gives_none_and_a_warning(
    default_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for f in default_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "tokenizer.json").write_text("{ not json")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "NoSuchTokenizerClass"}')
    llm = ft.load_model(tmp_path, device="cpu")
    assert llm.tokenizer is None
    assert "no usable tokenizer" in caplog.text


def test_folder_ids_need_no_store_import(llama_dir: Path) -> None:
    """A folder resolves without importing the store or the demo model (~40 ms inside every load)."""
    code = (
        "import sys; from flashtensors.models import resolve_model_dir; "
        f"p = resolve_model_dir({str(llama_dir)!r}); "
        "print(p, 'flashtensors.store' in sys.modules, 'flashtensors.demo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(llama_dir.resolve()), "False", "False"]
