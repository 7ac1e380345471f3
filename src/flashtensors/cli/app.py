"""`flash`: the typer app and its error handling.

Each group of commands lives in its own module and registers itself on :data:`app` through
:func:`register`; this module only wires them and turns :class:`FlashError` into one line + a hint.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from flashtensors.config import VARIABLES
from flashtensors.errors import FlashError

_ENV_HELP = "\n".join(f"  {v.env:<30} {v.description}" for v in VARIABLES)

app = typer.Typer(
    name="flash",
    help="Load model weights at the speed of the hardware; keep many models hot.\n\n"
    "Environment variables:\n\n" + _ENV_HELP.replace("\n", "\n\n"),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command("start", hidden=True)
def _start() -> None:
    """The daemon that keeps models hot between commands: promised, not built yet (hidden from --help)."""
    raise FlashError(
        "`flash start` (the daemon that keeps models hot between commands) is not built yet",
        hint='load in this process instead: flash run MODEL "prompt", or ft.load_model(...) in Python',
    )


# Modules that define commands; each exposes `register(app)`.
_COMMAND_MODULES = (
    "flashtensors.cli.store_cmds",
    "flashtensors.cli.run_cmd",
    "flashtensors.cli.bench_cmd",
)


_registered = False


def _register_all() -> None:
    global _registered
    if _registered:  # main() may run many times in one process (tests)
        return
    _registered = True
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that group is not written yet
                continue
            raise
        module.register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `flash`; returns the exit code."""
    _register_all()
    debug = os.environ.get("FLASH_DEBUG", "").lower() in ("1", "true", "yes", "on")
    try:
        app(args=argv, standalone_mode=False)
    except FlashError as exc:
        if debug:
            raise
        print(f"Error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # typer/click usage errors and explicit exits
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except Exception as exc:  # click raises its own exceptions in non-standalone mode
        exits, usage, aborts = _click_exceptions()
        if isinstance(exc, exits):
            return int(getattr(exc, "exit_code", 0))
        if isinstance(exc, usage):  # a usage error (unknown command or option, missing argument)
            exc.show()  # type: ignore[attr-defined]
            return int(getattr(exc, "exit_code", 2))
        if isinstance(exc, aborts):
            print("aborted", file=sys.stderr)
            return 1
        raise
    return 0


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(exit, usage/ClickException, abort) classes of the click typer runs on.

    Older typer releases run on the ``click`` package; newer ones (0.29 here) carry their own copy
    (``typer._click``), whose exceptions are other classes. Both are looked for, so a usage error is one
    message (and the command's help hint) with either, never a traceback.
    """
    exits: list[type] = []
    usage: list[type] = []
    aborts: list[type] = []
    for name in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for bucket, attr in ((exits, "Exit"), (usage, "ClickException"), (aborts, "Abort")):
            cls = getattr(module, attr, None)
            if isinstance(cls, type) and cls not in bucket:
                bucket.append(cls)
    return tuple(exits), tuple(usage), tuple(aborts)


if __name__ == "__main__":
    sys.exit(main())
