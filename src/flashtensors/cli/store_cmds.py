"""`flash pull / list / show / rm / verify`: the store commands.

Results go to stdout, progress to stderr; listing commands take ``--json``. Errors are FlashErrors, which
``flash`` prints as one line plus a hint (exit code 1).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Annotated, Any

import typer

from flashtensors.store.progress import human_size


def human_ago(when: datetime, now: datetime | None = None) -> str:
    """``3 hours ago``, ``About a minute ago``, ``2 weeks ago``: how long since ``when``."""
    now = now or datetime.now(timezone.utc)
    seconds = max(0, int((now - when).total_seconds()))
    if seconds < 1:
        return "Less than a second ago"
    steps = (
        (60, 1, "second"),
        (3600, 60, "minute"),
        (86400, 3600, "hour"),
        (7 * 86400, 86400, "day"),
        (30 * 86400, 7 * 86400, "week"),
        (365 * 86400, 30 * 86400, "month"),
    )
    unit, word = next(((u, w) for limit, u, w in steps if seconds < limit), (365 * 86400, "year"))
    n = seconds // unit
    if n == 1:
        return (
            f"About {'an' if word == 'hour' else 'a'} {word} ago"
            if word in ("minute", "hour")
            else f"1 {word} ago"
        )
    return f"{n} {word}s ago"


def human_count(n: int) -> str:
    """Parameter counts the way model cards write them: ``596.0M``, ``8.2B``, ``90.5K``."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(n)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def pull_cmd(
    model: Annotated[str, typer.Argument(help="hub id (org/name[@revision]) or a local folder")],
    revision: Annotated[str | None, typer.Option("--revision", help="hub branch, tag or commit")] = None,
    name: Annotated[str | None, typer.Option("--name", help="store it as org/name")] = None,
    force: Annotated[bool, typer.Option("--force", help="fetch again and replace the stored copy")] = False,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="also keep the model's *.py files")
    ] = False,
) -> None:
    """Put a model into the local store (from the hub, the HF cache or a folder)."""
    from flashtensors.store import pull

    result = pull(model, revision=revision, name=name, force=force, trust_remote_code=trust_remote_code)
    if result.already_present:
        typer.echo(
            f"{result.name!r} is already in the store ({human_size(result.size)}); --force pulls it again"
        )
    else:
        typer.echo(f"pulled {result.name!r} ({human_size(result.size)}) into {result.path}")


def list_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """List the models in the local store."""
    from flashtensors.store import list_models

    records = list_models()
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in records], indent=2))
        return
    rows = [[r.name, human_size(r.size), human_ago(r.modified)] for r in records]
    typer.echo(_table(rows, ["NAME", "SIZE", "MODIFIED"]))


def _describe_source(source: dict[str, Any]) -> str:
    kind = source.get("type")
    if kind == "local":
        return f"folder {source.get('id')}"
    text = f"{'hub' if kind == 'hub' else 'HF cache'} {source.get('id')}"
    if source.get("revision"):
        text += f" @ {source['revision']}"
    if source.get("commit"):
        text += f" (commit {str(source['commit'])[:12]})"
    return text


def show_cmd(
    model: Annotated[str, typer.Argument(help="a model in the store")],
    as_json: Annotated[bool, typer.Option("--json", help="print the whole manifest as JSON")] = False,
) -> None:
    """Show a stored model: architecture, dtype, parameters, files and hashes."""
    from flashtensors.store import resolve_model_path, show

    manifest = show(model)
    if as_json:
        typer.echo(json.dumps(manifest, indent=2))
        return
    fields = [
        ("name", manifest.get("name")),
        ("path", resolve_model_path(str(manifest.get("name") or model))),
        ("source", _describe_source(manifest.get("source") or {})),
        ("architecture", manifest.get("architecture") or "unknown"),
        ("dtype", manifest.get("dtype") or "unknown"),
        ("parameters", human_count(int(manifest.get("parameters") or 0))),
        ("tensors", len(manifest.get("tensors") or {})),
        ("size", human_size(int(manifest.get("size") or 0))),
        ("pulled", manifest.get("created")),
    ]
    for key, value in fields:
        typer.echo(f"  {key:<14}{value}")
    typer.echo(f"\n  files ({manifest.get('hash_algorithm')})")
    rows = [
        [
            f"    {f['path']}",
            human_size(f["size"]),
            f["hash"] + (f"  <- {f['converted_from']}" if f.get("converted_from") else ""),
        ]
        for f in manifest.get("files", [])
    ]
    typer.echo(_table(rows, ["    FILE", "SIZE", "HASH"]))


def rm_cmd(
    models: Annotated[list[str], typer.Argument(help="one or more models in the store")],
) -> None:
    """Remove models from the local store."""
    from flashtensors.store import remove

    for model in models:
        typer.echo(f"deleted {remove(model)!r}")


def verify_cmd(
    model: Annotated[str, typer.Argument(help="a model in the store")],
) -> None:
    """Re-hash every file of a stored model and compare with its manifest (exit 1 on any difference)."""
    from flashtensors.store import verify

    report = verify(model)
    typer.echo(
        f"verified {report['name']!r}: {report['files']} files, {human_size(report['size'])}, "
        f"all hashes match ({report['seconds']:.1f} s)"
    )


def register(app: typer.Typer) -> None:
    """Add the store commands to ``app`` (once, however often it is called)."""
    if any(c.name == "pull" for c in app.registered_commands):
        return
    app.command("pull")(pull_cmd)
    app.command("list")(list_cmd)
    app.command("show")(show_cmd)
    app.command("rm")(rm_cmd)
    app.command("verify")(verify_cmd)
