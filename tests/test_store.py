"""The local store: pull from folders and the HF cache, list/show/rm/verify, .bin conversion, failures.

Checkpoints are the tiny transformers models of conftest (``qwen3_dir``, ``llama_dir``) or files written
here; the reference for every byte is the source folder or ``safetensors.torch.load_file``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import flashtensors as ft
from flashtensors.errors import ConfigError, FormatError, IntegrityError, ModelNotFound, PullError, StoreError
from flashtensors.store import StoreLayout, list_models, pull, remove, resolve_model_path, show, verify
from flashtensors.store import build as build_mod
from flashtensors.store import pulling as pull_mod
from helpers.compare import assert_same


@pytest.fixture(autouse=True)
def no_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF cache of our own, and a hub endpoint where nothing listens (no network, ever)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}"
    )
    return cache


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tmp_entries() -> list[str]:
    tmp = StoreLayout.current().tmp
    return sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []


def test_pull_local_folder_stores_stock_files_and_a_manifest(qwen3_dir: Path) -> None:
    result = pull(str(qwen3_dir), progress=False)

    root = StoreLayout.current().root
    assert result.name == f"local/{qwen3_dir.name}" and not result.already_present
    assert result.path == root / "models" / "local" / qwen3_dir.name == resolve_model_path(result.name)
    source_files = sorted(p.name for p in qwen3_dir.iterdir() if p.is_file())
    stored = sorted(p.name for p in result.path.iterdir())
    assert stored == sorted([*source_files, "flash-manifest.json"])
    for name in source_files:
        assert _sha(result.path / name) == _sha(qwen3_dir / name), name

    manifest = show(result.name)
    config = json.loads((qwen3_dir / "config.json").read_text())
    ref: dict[str, torch.Tensor] = {}
    for f in qwen3_dir.glob("*.safetensors"):
        ref.update({k: v for k, v in load_file(f).items()})
    assert manifest["architecture"] == "Qwen3ForCausalLM" == config["architectures"][0]
    assert manifest["dtype"] == "bfloat16"
    assert manifest["parameters"] == sum(t.numel() for t in ref.values())
    assert manifest["size"] == sum((qwen3_dir / n).stat().st_size for n in source_files) == result.size
    assert manifest["source"] == {
        "type": "local",
        "id": str(qwen3_dir.resolve()),
        "revision": None,
        "commit": None,
    }
    assert set(manifest["tensors"]) == set(ref)
    for tensor, fname in manifest["tensors"].items():
        assert tensor in load_file(result.path / fname)
    assert [m.name for m in list_models()] == [result.name] == [m.name for m in ft.list_models()]
    assert _tmp_entries() == []
    assert (ft.pull, ft.remove) == (pull, remove)


def test_engine_loads_a_pulled_model_by_id_bit_for_bit(llama_dir: Path) -> None:
    api = pytest.importorskip("flashtensors.engine.api")
    pull(str(llama_dir), name="acme/llama", progress=False)
    assert_same(api.load_state_dict("acme/llama"), load_file(llama_dir / "model.safetensors"))


def test_pull_again_is_a_no_op_and_force_replaces(qwen3_dir: Path) -> None:
    first = pull(str(qwen3_dir), progress=False)
    again = pull(str(qwen3_dir), progress=False)
    assert again.already_present and again.modified == first.modified
    forced = pull(str(qwen3_dir), force=True, progress=False)
    assert not forced.already_present
    verify(forced.name)


def test_a_name_taken_by_another_source_needs_force(qwen3_dir: Path, llama_dir: Path) -> None:
    pull(str(qwen3_dir), name="me/model", progress=False)
    with pytest.raises(StoreError, match="already in the store") as info:
        pull(str(llama_dir), name="me/model", progress=False)
    assert "--force" in info.value.hint
    assert show("me/model")["architecture"] == "Qwen3ForCausalLM"
    pull(str(llama_dir), name="me/model", force=True, progress=False)
    assert show("me/model")["architecture"] == "LlamaForCausalLM"
    assert verify("me/model")["files"] == len(show("me/model")["files"])


def test_verify_names_the_file_with_a_flipped_byte(qwen3_dir: Path) -> None:
    result = pull(str(qwen3_dir), progress=False)
    assert verify(result.name)["files"] == len(list(qwen3_dir.iterdir()))
    shard = sorted(result.path.glob("model-*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.seek(shard.stat().st_size - 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(IntegrityError, match=shard.name) as info:
        verify(result.name)
    assert "content changed" in info.value.message
    assert f"flash pull {qwen3_dir.resolve()} --force" in info.value.hint


def test_verify_reports_a_missing_file(llama_dir: Path) -> None:
    result = pull(str(llama_dir), progress=False)
    (result.path / "generation_config.json").unlink()
    with pytest.raises(IntegrityError, match="generation_config.json: missing"):
        verify(result.name)


def test_remove_and_not_found_errors_name_flash_pull(llama_dir: Path) -> None:
    result = pull(str(llama_dir), name="acme/llama", progress=False)
    assert remove("acme/llama") == "acme/llama"
    assert not result.path.exists() and list_models() == []
    for call in (resolve_model_path, show, verify, remove):
        with pytest.raises(ModelNotFound) as info:
            call("acme/llama")
        assert "flash pull acme/llama" in info.value.hint
    with pytest.raises(ModelNotFound, match="neither a file"):
        resolve_model_path("/no/such/checkpoint.safetensors")


def test_bare_names_and_revisions_resolve(llama_dir: Path, qwen3_dir: Path) -> None:
    pull(str(llama_dir), name="acme/tiny", progress=False)
    assert resolve_model_path("tiny") == resolve_model_path("acme/tiny")
    pull(str(qwen3_dir), name="other/tiny", progress=False)
    with pytest.raises(ModelNotFound, match="ambiguous"):
        resolve_model_path("tiny")
    with pytest.raises(ModelNotFound, match="stored at revision") as info:
        resolve_model_path("acme/tiny@v2")
    assert "flash pull acme/tiny@v2" in info.value.hint
    with pytest.raises(ConfigError):
        pull(str(llama_dir), name="../escape", progress=False)
    with pytest.raises(ConfigError, match="revision"):
        pull(str(llama_dir), revision="main", progress=False)


def test_remote_code_only_with_trust_remote_code(llama_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "custom"
    shutil.copytree(llama_dir, src)
    (src / "modeling_custom.py").write_text("raise SystemExit('never run me')\n")
    (src / "optimizer.pt").write_bytes(b"not weights")
    (src / "README.md").write_text("hello\n")
    (src / "original").mkdir()
    (src / "original" / "consolidated.safetensors").write_bytes(b"ignored")
    plain = pull(str(src), progress=False)
    assert not (plain.path / "modeling_custom.py").exists()
    assert sorted(p.name for p in plain.path.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "flash-manifest.json"]
    )
    trusted = pull(str(src), name="local/custom-trusted", trust_remote_code=True, progress=False)
    assert (trusted.path / "modeling_custom.py").read_text() == (src / "modeling_custom.py").read_text()


def _tied_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    emb = torch.randn(64, 16, generator=g).to(torch.bfloat16)
    big = torch.randn(8, 32, generator=g)
    return {
        "model.embed_tokens.weight": emb,
        "lm_head.weight": emb,  # the same storage: safetensors refuses it unless cloned
        "model.norm.weight": torch.ones(16, dtype=torch.float16),
        "model.layers.0.mlp.up_proj.weight": big[:, :16],  # a non-contiguous view
        "model.layers.0.mlp.down_proj.weight": big[:, 16:].t(),
        "model.layers.0.step": torch.tensor(3, dtype=torch.int64),
    }


def test_bin_weights_are_converted_bit_for_bit(tmp_path: Path) -> None:
    src = tmp_path / "binmodel"
    src.mkdir()
    sd = _tied_state_dict()
    torch.save(sd, src / "pytorch_model.bin")
    (src / "training_args.bin").write_bytes(b"\x80\x04 pickled trainer state, never loaded")
    (src / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"})
    )
    result = pull(str(src), progress=False)
    assert sorted(p.name for p in result.path.iterdir()) == [
        "config.json",
        "flash-manifest.json",
        "model.safetensors",
    ]
    assert_same(load_file(result.path / "model.safetensors"), sd)
    entry = next(f for f in show(result.name)["files"] if f["path"] == "model.safetensors")
    assert entry["converted_from"] == "pytorch_model.bin"


def test_sharded_bin_weights_get_a_safetensors_index(tmp_path: Path) -> None:
    src = tmp_path / "sharded-bin"
    src.mkdir()
    sd = _tied_state_dict()
    names = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": names[:3], "pytorch_model-00002-of-00002.bin": names[3:]}
    for fname, keys in shards.items():
        torch.save({k: sd[k] for k in keys}, src / fname)
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    result = pull(str(src), name="acme/sharded", progress=False)
    index = json.loads((result.path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        k: f.replace("pytorch_model", "model").replace(".bin", ".safetensors") for k, f in weight_map.items()
    }
    got: dict[str, torch.Tensor] = {}
    for f in set(index["weight_map"].values()):
        got.update(load_file(result.path / f))
    assert_same(got, sd)
    assert not (result.path / "pytorch_model.bin.index.json").exists()
    verify("acme/sharded")


def test_a_pickle_that_needs_code_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "evil"
    src.mkdir()
    torch.save(
        {"w": torch.zeros(2), "opt": torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)},
        src / "model.pt",
    )
    with pytest.raises(FormatError, match="weights_only"):
        pull(str(src), progress=False)
    assert list_models() == [] and _tmp_entries() == []


def test_a_bad_safetensors_header_stores_nothing(llama_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "broken"
    shutil.copytree(llama_dir, src)
    data = bytearray((src / "model.safetensors").read_bytes())
    data[8:9] = b"["  # the header JSON no longer starts with '{'
    (src / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(FormatError, match="model.safetensors"):
        pull(str(src), progress=False)
    assert list_models() == [] and _tmp_entries() == []
    assert not StoreLayout.current().model_dir(ft.store.parse_model_id("broken")).exists()


def test_an_index_naming_a_missing_shard_is_refused(qwen3_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "partial"
    shutil.copytree(qwen3_dir, src)
    sorted(src.glob("model-*.safetensors"))[0].unlink()
    with pytest.raises(FormatError, match="does not have"):
        pull(str(src), progress=False)
    with pytest.raises(ModelNotFound, match="no model folder"):
        pull(str(tmp_path / "nowhere"), progress=False)


def test_disk_full_before_copying(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pull_mod.fsutil, "free_bytes", lambda _path: 1000)
    with pytest.raises(StoreError, match=r"disk full.*free 0\.1 GB") as info:
        pull(str(llama_dir), progress=False)
    assert "FLASH_HOME" in info.value.hint
    assert list_models() == [] and _tmp_entries() == []


def test_disk_full_while_copying_removes_the_partial_build(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = build_mod.copy_and_hash

    def fill_disk(src: Path, dst: Path, **kw: object) -> tuple[int, str]:
        if src.suffix == ".safetensors":
            dst.write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(build_mod, "copy_and_hash", fill_disk)
    with pytest.raises(StoreError, match="disk full"):
        pull(str(llama_dir), progress=False)
    assert list_models() == [] and _tmp_entries() == []


def _fake_hf_cache(cache: Path, repo: str, src: Path, commit: str, files: list[str]) -> Path:
    """The real HF cache layout: blobs named by hash, snapshot entries as relative symlinks, refs/main."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in files:
        blob = storage / "blobs" / _sha(src / name)
        shutil.copyfile(src / name, blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    return storage


def test_a_model_in_the_hf_cache_is_taken_without_network(qwen3_dir: Path, no_hub: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    files = sorted(p.name for p in qwen3_dir.iterdir())
    storage = _fake_hf_cache(no_hub, "acme/tiny-qwen3", qwen3_dir, commit, files)
    result = pull("acme/tiny-qwen3", progress=False)  # the endpoint is dead: any request would fail
    assert result.name == "acme/tiny-qwen3" and result.revision == commit
    manifest = show("acme/tiny-qwen3")
    assert manifest["source"] == {
        "type": "hf-cache",
        "id": "acme/tiny-qwen3",
        "revision": "main",
        "commit": commit,
    }
    for name in files:
        stored = result.path / name
        assert _sha(stored) == _sha(qwen3_dir / name)
        # Same file system: a hard link to the blob, no second copy of the weights.
        assert stored.stat().st_ino == (storage / "blobs" / _sha(qwen3_dir / name)).stat().st_ino
    assert resolve_model_path(f"acme/tiny-qwen3@{commit[:10]}") == result.path
    assert resolve_model_path("acme/tiny-qwen3@main") == result.path


def test_a_partial_hf_cache_entry_goes_to_the_hub(llama_dir: Path, no_hub: Path) -> None:
    _fake_hf_cache(no_hub, "acme/half", llama_dir, "f" * 40, ["config.json"])
    with pytest.raises(PullError, match="cannot reach") as info:
        pull("acme/half", progress=False)
    assert "HF cache" in info.value.hint
    assert list_models() == []
    with pytest.raises(ConfigError, match="org/name"):
        pull("just-a-name", progress=False)
