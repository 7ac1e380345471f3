"""`flash run` and `flash demo`, in-process, on the built-in default model (built offline)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

import flashtensors as ft
from flashtensors.cli.app import main
from flashtensors.cli.run_cmd import _chat_prompt
from flashtensors.demo import DEFAULT_MODEL_ID, build_tokenizer


def test_run_default_model_streams_its_greedy_completion(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["run", DEFAULT_MODEL_ID, "The cat walked", "-t", "0", "-n", "6", "--device", "cpu", "-v"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.strip()
    want = ft.load_model(DEFAULT_MODEL_ID, device="cpu").generate(
        "The cat walked", temperature=0, max_tokens=6
    )
    assert out == want[0].text + "\n"
    assert "loaded flashtensors/tiny-random-qwen3" in err and "GB/s" in err and "tokens/s" in err


def test_run_reads_the_prompt_from_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Numbers matter here"))
    assert main(["run", DEFAULT_MODEL_ID, "-t", "0", "-n", "3", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip()


def test_run_without_prompt_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tty = io.StringIO()
    monkeypatch.setattr(tty, "isatty", lambda: True)
    monkeypatch.setattr(sys, "stdin", tty)
    assert main(["run", DEFAULT_MODEL_ID]) == 1
    err = capsys.readouterr().err
    assert "Error: no prompt given" in err and "hint: flash run MODEL" in err


def test_run_unknown_backend(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", DEFAULT_MODEL_ID, "hi", "--backend", "nope"]) == 1
    err = capsys.readouterr().err
    assert "Error: unknown backend 'nope'; valid backends:" in err and "transformers" in err
    assert "  hint: " in err


def test_run_missing_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path / "nowhere"), "hi"]) == 1
    assert "Error: no model folder at" in capsys.readouterr().err
    assert main(["run", "not-a-stored-model", "hi"]) == 1
    err = capsys.readouterr().err
    assert "Error: " in err and "not-a-stored-model" in err and "flash pull" in err


def test_run_folder_without_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "weights").mkdir()
    assert main(["run", str(tmp_path / "weights"), "hi", "--device", "cpu"]) == 1
    assert "has no config.json" in capsys.readouterr().err


def test_chat_template_is_applied_when_the_model_has_one() -> None:
    tok = build_tokenizer()
    assert _chat_prompt(tok, "hi") == "hi"  # no template: the prompt goes as is
    tok.chat_template = "{% for m in messages %}<|startoftext|>{{ m['content'] }}\n{% endfor %}"
    prompt = _chat_prompt(tok, "hi")
    assert isinstance(prompt, dict) and prompt["prompt"] == "hi"
    assert prompt["prompt_token_ids"] == tok("<|startoftext|>hi\n")["input_ids"]


def test_demo_runs_offline_and_compares(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["demo", "--device", "cpu", "--repeat", "1", "-n", "4"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "same logits, bit for bit: yes" in out
    assert "flashtensors  ft.load_model" in out and "transformers  from_pretrained" in out
    assert out.count("GB/s") >= 2 and "completion (greedy" in out
    assert len(out.splitlines()) <= 10  # short enough to read at a glance
