"""`flash` usage errors: one message and a pointer to --help, never a traceback."""

from __future__ import annotations

import pytest

from flashtensors.cli.app import main


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["no-such-command"], "No such command 'no-such-command'"),
        (["run", "--no-such-option"], "No such option: --no-such-option"),
        (["pull"], "Missing argument 'model'"),
        (["bench", "make"], "Missing argument"),
    ],
    ids=["command", "option", "argument", "subcommand-argument"],
)
def test_usage_errors_are_one_message(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert says in err
    assert "--help' for help" in err
    assert "Traceback" not in out + err


def test_no_arguments_shows_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code = main([])
    out, err = capsys.readouterr()
    assert code in (0, 2)  # click's code for "help shown instead of a command" changed across versions
    assert "Commands" in out + err and "pull" in out + err
    assert "Traceback" not in out + err


def test_start_says_the_daemon_is_not_built(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["start"]) == 1
    out, err = capsys.readouterr()
    assert "not built yet" in err and "flash run MODEL" in err
    assert "start" not in main_help(capsys)


def main_help(capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["--help"]) == 0
    out, _ = capsys.readouterr()
    return out.split("Commands", 1)[1]
