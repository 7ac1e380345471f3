"""`flash bench pool`: rounds of several runs pooled, each loader's run against the raw read and the
peers of the same round. Reports are built here with known times, so every figure can be checked by
hand; a report from a real CPU run is pooled too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flashtensors.bench.pool import format_pool, pool, rounds
from flashtensors.bench.runner import engine_settings
from flashtensors.cli.app import main

GB = 10**9


def _report(
    shape: str,
    ours: list[float],
    peer: list[float],
    raw: list[float],
    settings: dict[str, str] | None,
    scenario: str = "cold",
) -> dict[str, Any]:
    """A report of one 2 GB checkpoint: per repeat, our seconds, the peer's seconds, the raw GB/s."""
    runs = [
        {"loader": name, "scenario": scenario, "repeat": i, "seconds": sec, "status": "ok"}
        for name, times in (("flashtensors", ours), ("fastsafetensors", peer))
        for i, sec in enumerate(times)
    ]
    report: dict[str, Any] = {
        "checkpoint": {"directory": f"/x/{shape}", "bytes": 2 * GB, "shape": {"name": shape}},
        "runs": runs,
        "disk_runs": [{"repeat": i, "gbps": g, "status": "ok"} for i, g in enumerate(raw)],
    }
    if settings is not None:
        report["settings"] = settings
    return report


def test_rounds_pair_each_run_with_its_own_round() -> None:
    report = _report("m", ours=[1.0, 2.0], peer=[2.0, 1.0], raw=[2.5, 1.0], settings={})
    got = rounds(report, "flashtensors")["cold"]
    assert [(e["gbps"], e["raw_gbps"]) for e in got] == [(2.0, 2.5), (1.0, 1.0)]
    assert [e["peers"]["fastsafetensors"]["seconds"] for e in got] == [2.0, 1.0]


def test_pool_groups_by_shape_and_settings_and_computes_by_hand() -> None:
    a = _report("m", ours=[1.0, 1.0], peer=[1.1, 0.9], raw=[2.0, 2.5], settings={})
    b = _report("m", ours=[2.0], peer=[2.4], raw=[1.0], settings={})
    c = _report("m", ours=[1.0], peer=[2.0], raw=[2.0], settings={"FLASH_RING_SIZE": "512M"})
    old = _report("m", ours=[1.0], peer=[1.0], raw=[2.0], settings=None)
    rows = {r["settings"]: r for r in pool([a, b, c, old])}
    assert set(rows) == {"defaults", "FLASH_RING_SIZE=512M", "not recorded"}
    d = rows["defaults"]
    assert (d["runs"], d["rounds"]) == (2, 3)
    # ours: 2.0 GB/s twice, against 2.0 and 2.5; 1.0 GB/s against 1.0 -> 1.0, 0.8, 1.0
    assert d["of_raw"] == {"median": 1.0, "q1": 0.9, "q3": 1.0}
    peer = d["peers"]["fastsafetensors"]
    assert (peer["rounds"], peer["faster"]) == (3, 2)  # 1.1 and 1.2 times ours; 0.9 is not
    assert peer["ratio"] == pytest.approx(1.1)
    # the peer: 2/1.1/2.0, 2/0.9/2.5, 2/2.4/1.0 GB/s over raw -> 0.909, 0.889, 0.833
    assert peer["of_raw"] == pytest.approx(2 / 0.9 / 2.5)
    assert rows["FLASH_RING_SIZE=512M"]["peers"]["fastsafetensors"]["ratio"] == 2.0


def test_a_failed_run_or_a_missing_peer_leaves_its_round_out() -> None:
    report = _report("m", ours=[1.0, 1.0, 1.0], peer=[2.0, 2.0], raw=[2.0, 2.0, 2.0], settings={})
    report["runs"][1]["status"] = "error"  # our second run
    rows = pool([report])
    assert rows[0]["rounds"] == 2
    assert rows[0]["peers"]["fastsafetensors"]["rounds"] == 1  # the peer ran in repeats 0 and 1 only


def test_warm_rounds_have_no_raw_read() -> None:
    rows = pool([_report("m", ours=[0.1], peer=[0.5], raw=[], settings={}, scenario="warm")])
    assert "of_raw" not in rows[0] and rows[0]["peers"]["fastsafetensors"]["ratio"] == 5.0
    table = format_pool(rows)
    assert "5.00x" in table and "1 of 1" in table


def test_the_runs_record_the_engine_settings_they_were_started_with(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASH_RING_SIZE", "512M")
    monkeypatch.setenv("FLASH_HOME", "/somewhere")  # where the store lives is not a tuning
    monkeypatch.delenv("FLASH_IO_THREADS", raising=False)
    assert engine_settings() == {"FLASH_RING_SIZE": "512M"}


def test_the_command_pools_files_and_explains_bad_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "run.json"
    good.write_text(json.dumps(_report("m", ours=[1.0], peer=[1.5], raw=[2.0], settings={})))
    assert main(["bench", "pool", str(good), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| m | cold | defaults | 1 | 1 | 100% (100-100%) | fastsafetensors | 67% | 1 of 1 | 1.50x |" in out

    notjson = tmp_path / "notes.txt"
    notjson.write_text("hello")
    other = tmp_path / "other.json"
    other.write_text("[1, 2]")
    for path, says in (
        (tmp_path / "missing.json", "no such file"),
        (notjson, "is not a bench report"),
        (other, "no checkpoint or runs"),
    ):
        assert main(["bench", "pool", str(path)]) == 1
        err = capsys.readouterr().err
        assert says in err and "flash bench run" in err and "Traceback" not in err

    assert main(["bench", "pool", str(good), "--loader", "runai"]) == 1
    assert "no timed run of runai" in capsys.readouterr().err
