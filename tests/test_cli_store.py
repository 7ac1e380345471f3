"""`flash pull / list / show / rm / verify`: output, exit codes and error lines, in-process and as `flash`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from flashtensors.cli.app import main
from flashtensors.cli.store_cmds import human_ago, human_count
from flashtensors.store.progress import human_size


@pytest.fixture(autouse=True)
def no_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_pull_list_show_verify_rm(capsys: pytest.CaptureFixture[str], qwen3_dir: Path) -> None:
    code, out, err = run(capsys, "pull", str(qwen3_dir), "--name", "acme/tiny")
    assert code == 0
    size = sum(p.stat().st_size for p in qwen3_dir.iterdir())
    home = Path(os.environ["FLASH_HOME"])
    assert out == f"pulled 'acme/tiny' ({human_size(size)}) into {home / 'models/acme/tiny'}\n"
    shards = sorted(p.name for p in qwen3_dir.glob("*.safetensors"))
    for shard in shards:
        assert f"copied {shard} (" in err  # progress on stderr, one line per file (not a terminal)
    assert "\r" not in err

    code, out, _ = run(capsys, "pull", str(qwen3_dir), "--name", "acme/tiny")
    assert code == 0 and out.startswith("'acme/tiny' is already in the store")

    code, out, _ = run(capsys, "list")
    header, row = out.splitlines()
    assert header.split() == ["NAME", "SIZE", "MODIFIED"]
    assert row.split()[0] == "acme/tiny" and human_size(size) in row and row.endswith("ago")

    code, out, _ = run(capsys, "list", "--json")
    (record,) = json.loads(out)
    assert (
        record["name"] == "acme/tiny"
        and record["size"] == size
        and record["architecture"] == "Qwen3ForCausalLM"
    )

    code, out, _ = run(capsys, "show", "acme/tiny")
    assert code == 0
    assert "Qwen3ForCausalLM" in out and "bfloat16" in out and "xxh3_128" in out
    manifest = json.loads((home / "models/acme/tiny/flash-manifest.json").read_text())
    for f in manifest["files"]:
        assert f["path"] in out and f["hash"] in out
    assert f"parameters    {human_count(manifest['parameters'])}" in out

    code, out, _ = run(capsys, "show", "acme/tiny", "--json")
    assert json.loads(out) == manifest

    code, out, _ = run(capsys, "verify", "acme/tiny")
    assert code == 0 and out.startswith(f"verified 'acme/tiny': {len(manifest['files'])} files")

    code, out, _ = run(capsys, "rm", "acme/tiny")
    assert (code, out) == (0, "deleted 'acme/tiny'\n")
    code, out, _ = run(capsys, "list")
    assert out.strip() == "NAME   SIZE   MODIFIED"


def test_verify_reports_the_damaged_file_and_exits_1(
    capsys: pytest.CaptureFixture[str], llama_dir: Path
) -> None:
    assert run(capsys, "pull", str(llama_dir), "--name", "acme/llama")[0] == 0
    stored = Path(os.environ["FLASH_HOME"]) / "models/acme/llama/model.safetensors"
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))
    code, out, err = run(capsys, "verify", "acme/llama")
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert lines[0].startswith("Error: acme/llama: model.safetensors: content changed")
    repull = f"flash pull {llama_dir.resolve()} --name acme/llama --force"
    assert lines[1] == f"  hint: the stored copy is damaged: run `{repull}` to fetch it again"


@pytest.mark.parametrize("command", ["show", "verify", "rm"])
def test_unknown_model_names_flash_pull(capsys: pytest.CaptureFixture[str], command: str) -> None:
    code, out, err = run(capsys, command, "acme/ghost")
    assert code == 1 and out == ""
    assert err.splitlines()[0].startswith("Error: model 'acme/ghost' is not in the store")
    assert "`flash pull acme/ghost`" in err.splitlines()[1]


def test_pull_errors(capsys: pytest.CaptureFixture[str], llama_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(llama_dir, bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.write((2**40).to_bytes(8, "little"))  # a header size larger than the file
    code, out, err = run(capsys, "pull", str(bad))
    assert code == 1 and out == ""
    assert "not a valid safetensors file: header size" in err and "hint:" in err
    assert not (Path(os.environ["FLASH_HOME"]) / "models/local/bad").exists()

    code, _, err = run(capsys, "pull", str(tmp_path / "missing-folder"))
    assert code == 1 and "Error: no model folder at" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    code, _, err = run(capsys, "pull", str(empty))
    assert code == 1 and "no weights found" in err

    code, _, err = run(capsys, "pull", "acme/unreachable")
    assert code == 1 and "cannot reach http://127.0.0.1:9" in err


def test_verify_reports_a_missing_file(capsys: pytest.CaptureFixture[str], llama_dir: Path) -> None:
    run(capsys, "pull", str(llama_dir))
    (Path(os.environ["FLASH_HOME"]) / "models/local" / llama_dir.name / "config.json").unlink()
    code, _, err = run(capsys, "verify", llama_dir.name)
    assert code == 1 and "config.json: missing" in err


def test_human_formats() -> None:
    now = datetime(2025, 1, 1, tzinfo=timezone.utc)
    cases = {
        timedelta(0): "Less than a second ago",
        timedelta(seconds=1): "1 second ago",
        timedelta(seconds=42): "42 seconds ago",
        timedelta(seconds=90): "About a minute ago",
        timedelta(minutes=5): "5 minutes ago",
        timedelta(minutes=61): "About an hour ago",
        timedelta(hours=3): "3 hours ago",
        timedelta(days=2): "2 days ago",
        timedelta(days=15): "2 weeks ago",
        timedelta(days=70): "2 months ago",
        timedelta(days=800): "2 years ago",
    }
    for delta, text in cases.items():
        assert human_ago(now - delta, now) == text
    assert [human_size(n) for n in (17, 1_234, 532_000_000, 1_200_000_000, 65_500_000_000)] == [
        "17 B", "1.2 KB", "532 MB", "1.2 GB", "65.5 GB",
    ]  # fmt: skip
    assert [human_count(n) for n in (999, 90_496, 596_049_920, 8_190_735_360)] == [
        "999",
        "90.5K",
        "596.0M",
        "8.2B",
    ]


def test_the_flash_command_in_a_subprocess(llama_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "FLASH_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    flash = str(Path(sys.executable).with_name("flash"))

    def sh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([flash, *args], env=env, capture_output=True, text=True, timeout=60)

    pulled = sh("pull", str(llama_dir), "--name", "acme/llama")
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.startswith("pulled 'acme/llama' (")
    listed = sh("list", "--json")
    assert [m["name"] for m in json.loads(listed.stdout)] == ["acme/llama"]
    missing = sh("show", "acme/other")
    assert missing.returncode == 1 and missing.stdout == ""
    assert "Error: model 'acme/other' is not in the store" in missing.stderr
    assert "Traceback" not in missing.stderr
    removed = sh("rm", "acme/llama")
    assert (removed.returncode, removed.stdout) == (0, "deleted 'acme/llama'\n")
