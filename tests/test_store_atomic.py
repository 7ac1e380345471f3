"""A pull is atomic and locked: SIGKILL at any point leaves no model or the old one; concurrent pulls agree.

A child process runs the pull with ``flashtensors.store.build.stage_hook`` set: when it reaches the named
point it prints the point's name and blocks on stdin. The parent waits for that line (no sleeps), then
kills the child with SIGKILL, or lets it go on by writing a line to its stdin.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flashtensors.store import StoreLayout, list_models, pull, show, verify
from flashtensors.store.build import clean_stale

CHILD = r"""
import json, sys
from flashtensors.store import build, fsutil, pull
from flashtensors.store.progress import LineProgress

point, nth, kwargs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
if kwargs.pop("no_exchange", False):
    fsutil.exchange = lambda a, b: False  # the fallback swap of file systems without RENAME_EXCHANGE
seen = 0

def hook(name):
    global seen
    if name == point:
        seen += 1
        if seen == nth:
            print(name, flush=True)
            sys.stdin.readline()

build.stage_hook = hook
result = pull(progress=LineProgress(), **kwargs)
print("done", result.already_present, flush=True)
"""

BIG = 12 * 1024 * 1024  # more than one 8 MiB copy chunk, so a kill can land inside the file


def _checkpoint(root: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    root.mkdir()
    shard1 = {"model.embed_tokens.weight": torch.randn(BIG // 4 // 256, 256, generator=g)}
    shard2 = {
        "model.norm.weight": torch.randn(256, generator=g),
        "lm_head.weight": torch.randn(16, 256, generator=g),
    }
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    for name, sd in zip(names, (shard1, shard2), strict=True):
        save_file(sd, str(root / name), metadata={"format": "pt"})
    weight_map = {k: n for n, sd in zip(names, (shard1, shard2), strict=True) for k in sd}
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "seed": seed}))
    return root


@pytest.fixture
def sources(tmp_path: Path) -> tuple[Path, Path]:
    return _checkpoint(tmp_path / "v1", 1), _checkpoint(tmp_path / "v2", 2)


def _start(child: Path, point: str, nth: int, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(child), point, str(nth), json.dumps(kwargs)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run_until(child: Path, point: str, nth: int = 1, **kwargs: object) -> subprocess.Popen[str]:
    proc = _start(child, point, nth, **kwargs)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != point:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"child never reached {point!r} (said {line!r}): {err}")
    return proc


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()  # SIGKILL: no cleanup code of ours runs
    proc.communicate()
    assert proc.returncode == -9


@pytest.fixture
def child(tmp_path: Path) -> Path:
    path = tmp_path / "child_pull.py"
    path.write_text(CHILD)
    return path


def _hashes() -> dict[str, str]:
    return {f["path"]: f["hash"] for f in show("me/model")["files"]}


def _tmp_entries() -> list[str]:
    return sorted(p.name for p in StoreLayout.current().tmp.iterdir())


@pytest.mark.parametrize(
    ("point", "nth"),
    [("build-created", 1), ("chunk-copied", 2), ("file-stored", 2), ("manifest-written", 1)],
)
def test_a_first_pull_killed_anywhere_leaves_no_model(
    child: Path, sources: tuple[Path, Path], point: str, nth: int
) -> None:
    v1, _ = sources
    proc = _run_until(child, point, nth, source=str(v1), name="me/model")
    if point == "chunk-copied":  # prove the kill lands inside the big shard, not between files
        partial = list(StoreLayout.current().tmp.glob("*@build-*/model-00001-of-00002.safetensors"))
        assert len(partial) == 1 and 0 < partial[0].stat().st_size < (v1 / partial[0].name).stat().st_size
    _kill(proc)

    assert list_models() == []
    assert not (StoreLayout.current().models / "me" / "model").exists()
    assert _tmp_entries() != []  # the killed build is still there...

    result = pull(str(v1), name="me/model", progress=False)
    assert not result.already_present
    assert verify("me/model")["files"] == 4
    assert _tmp_entries() == []  # ...and the next pull cleaned it


@pytest.mark.parametrize(
    ("point", "nth", "no_exchange", "expect"),
    [
        ("chunk-copied", 2, False, "old"),
        ("manifest-written", 1, False, "old"),
        ("swapped", 1, False, "new"),
        ("moved-aside", 1, True, "old"),
        ("swapped", 1, True, "new"),
    ],
)
def test_a_replacing_pull_killed_anywhere_leaves_the_old_or_the_new_model(
    child: Path, sources: tuple[Path, Path], point: str, nth: int, no_exchange: bool, expect: str
) -> None:
    v1, v2 = sources
    pull(str(v1), name="me/model", progress=False)
    old = _hashes()
    proc = _run_until(child, point, nth, source=str(v2), name="me/model", force=True, no_exchange=no_exchange)
    _kill(proc)

    if point == "moved-aside":
        # Killed between the two renames of the fallback swap: the model is away until someone cleans up.
        assert list_models() == []
        clean_stale(StoreLayout.current())
    new_source = str((v2 if expect == "new" else v1).resolve())
    assert show("me/model")["source"]["id"] == new_source
    verify("me/model")
    if expect == "old":
        assert _hashes() == old
    else:
        assert _hashes() != old
    pull(str(v2), name="me/model", force=True, progress=False)
    assert show("me/model")["source"]["id"] == str(v2.resolve())
    assert _tmp_entries() == []


def test_a_second_pull_waits_for_the_first_then_finds_the_model(
    child: Path, sources: tuple[Path, Path]
) -> None:
    v1, _ = sources
    first = _run_until(child, "build-created", 1, source=str(v1), name="me/model")
    second = _start(child, "never", 1, source=str(v1), name="me/model")
    assert second.stderr is not None and first.stdin is not None
    assert "waiting for another pull of me/model" in second.stderr.readline()  # blocked on the lock
    first.stdin.write("go on\n")
    first.stdin.flush()
    out1, err1 = first.communicate()
    out2, err2 = second.communicate()
    assert first.returncode == 0 and second.returncode == 0, err1 + err2
    assert out1.strip() == "done False" and out2.strip() == "done True"
    verify("me/model")
    assert _tmp_entries() == []


def test_two_forced_pulls_at_once_both_succeed_and_leave_one_good_model(
    child: Path, sources: tuple[Path, Path]
) -> None:
    v1, v2 = sources
    procs = [_start(child, "never", 1, source=str(v), name="me/model", force=True) for v in (v1, v2)]
    results = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert show("me/model")["source"]["id"] in (str(v1.resolve()), str(v2.resolve()))
    verify("me/model")
    assert [m.name for m in list_models()] == ["me/model"]
    assert _tmp_entries() == []
