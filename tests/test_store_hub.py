"""Pulls from a hub: a local HTTP server speaks the routes huggingface_hub uses, so its real download code
runs (no mocks of huggingface_hub, no network beyond 127.0.0.1).

Routes, as huggingface_hub 2.x calls them (``hf_api.model_info``, ``file_download.get_hf_file_metadata``,
``file_download.http_get``):

* ``GET /api/models/{repo}[/revision/{rev}]`` -> ``{"id", "sha", "siblings": [{"rfilename", "size"}]}``;
  errors carry ``X-Error-Code: RepoNotFound | RevisionNotFound``;
* ``HEAD|GET /{repo}/resolve/{rev}/{file}`` -> ``X-Repo-Commit``, ``ETag``, ``Content-Length`` (and the body
  for GET); a missing file answers 404 with ``X-Error-Code: EntryNotFound``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from safetensors.torch import load_file

from flashtensors.errors import ModelNotFound, PullError, StoreError
from flashtensors.store import StoreLayout, pull, show, verify
from helpers.compare import assert_same

COMMIT_MAIN = "a" * 40
COMMIT_V1 = "b" * 40


class FakeHub:
    """Repos in memory: ``repos[repo_id] = {"refs": {rev: commit}, "commits": {commit: {file: bytes}}}``."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, dict]] = {}
        self.log: list[tuple[str, str]] = []  # (method, path) of every request
        self.missing: set[str] = set()  # files that answer 404 although the listing has them

    def add(
        self, repo: str, files: dict[str, bytes], *, commit: str = COMMIT_MAIN, ref: str = "main"
    ) -> None:
        entry = self.repos.setdefault(repo, {"refs": {}, "commits": {}})
        entry["refs"][ref] = commit
        entry["commits"][commit] = files

    def fetched(self) -> list[str]:
        return sorted(
            p.rsplit("/resolve/", 1)[1].split("/", 1)[1]
            for m, p in self.log
            if m == "GET" and "/resolve/" in p
        )


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest output clean
            return None

        def _send(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, code: str, status: int = 404, commit: str | None = None) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": code, "Content-Type": "application/json"}
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(status, headers, json.dumps({"error": code}).encode())

        def _files(self, repo: str, rev: str) -> tuple[str, dict[str, bytes]] | None:
            """(commit, files) of a revision; None after answering the hub's error for it."""
            if repo not in hub.repos:
                self._error("RepoNotFound", 401)
                return None
            entry = hub.repos[repo]
            commit = rev if rev in entry["commits"] else entry["refs"].get(rev)
            if commit is None:
                self._error("RevisionNotFound")
                return None
            return commit, entry["commits"][commit]

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.log.append((self.command, path))
            if path.startswith("/api/models/"):
                parts = path[len("/api/models/") :].split("/")
                repo, rev = (
                    "/".join(parts[:2]),
                    (parts[3] if len(parts) == 4 and parts[2] == "revision" else "main"),
                )
                found = self._files(repo, rev)
                if found is None:
                    return None
                commit, files = found
                siblings = [{"rfilename": n, "size": len(b)} for n, b in sorted(files.items())]
                body = json.dumps({"id": repo, "sha": commit, "siblings": siblings}).encode()
                return self._send(200, {"Content-Type": "application/json"}, body)
            if "/resolve/" in path:
                repo, rest = path.lstrip("/").split("/resolve/", 1)
                rev, filename = rest.split("/", 1)
                found = self._files(repo, rev)
                if found is None:
                    return None
                commit, files = found
                if filename not in files or filename in hub.missing:
                    return self._error("EntryNotFound", commit=commit)
                body = files[filename]
                headers = {
                    "X-Repo-Commit": commit,
                    "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
                    "Content-Type": "application/octet-stream",
                }
                return self._send(200, headers, body)
            self._send(404, {}, b"not found")

    return Handler


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeHub, str]]:
    from huggingface_hub import constants

    fake = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    try:
        yield fake, url
    finally:
        server.shutdown()
        server.server_close()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _tiny_repo(qwen3_dir: Path) -> dict[str, bytes]:
    files = _files(qwen3_dir)
    files.update(
        {
            "tokenizer.json": b'{"version": "1.0"}',
            "pytorch_model.bin": b"the same weights as pickles: never fetched when safetensors exist",
            "modeling_acme.py": b"raise SystemExit('remote code ran')\n",
            "README.md": b"# tiny\n",
            ".gitattributes": b"*.safetensors filter=lfs\n",
            "onnx/model.onnx": b"other format",
        }
    )
    return files


def test_pull_from_the_hub_fetches_only_what_loads(hub: tuple[FakeHub, str], qwen3_dir: Path) -> None:
    fake, _ = hub
    repo = _tiny_repo(qwen3_dir)
    fake.add("acme/tiny", repo)
    result = pull("acme/tiny", progress=False)

    expected = sorted([*(n for n in _files(qwen3_dir)), "tokenizer.json"])
    assert fake.fetched() == expected
    assert sorted(p.name for p in result.path.iterdir()) == sorted([*expected, "flash-manifest.json"])
    for name in expected:
        assert (result.path / name).read_bytes() == repo[name], name
    for shard in result.path.glob("*.safetensors"):
        assert_same(load_file(shard), load_file(qwen3_dir / shard.name))
    manifest = show("acme/tiny")
    assert manifest["source"] == {"type": "hub", "id": "acme/tiny", "revision": "main", "commit": COMMIT_MAIN}
    assert result.revision == COMMIT_MAIN
    verify("acme/tiny")
    assert sorted(StoreLayout.current().tmp.iterdir()) == []  # the download folder is gone

    requests = len(fake.log)
    again = pull("acme/tiny", progress=False)
    assert again.already_present and len(fake.log) == requests  # no request at all


def test_revisions_and_remote_code(hub: tuple[FakeHub, str], qwen3_dir: Path) -> None:
    fake, _ = hub
    repo = _tiny_repo(qwen3_dir)
    fake.add("acme/tiny", repo)
    fake.add(
        "acme/tiny",
        {**repo, "config.json": b'{"architectures": ["Qwen3ForCausalLM"], "v": 1}'},
        commit=COMMIT_V1,
        ref="v1",
    )
    result = pull("acme/tiny@v1", name="acme/tiny-v1", trust_remote_code=True, progress=False)
    assert json.loads((result.path / "config.json").read_text())["v"] == 1
    assert (result.path / "modeling_acme.py").read_bytes() == repo["modeling_acme.py"]
    assert show("acme/tiny-v1")["source"]["commit"] == COMMIT_V1
    assert ("GET", "/api/models/acme/tiny/revision/v1") in fake.log

    with pytest.raises(ModelNotFound, match="no revision 'v9'"):
        pull("acme/tiny", revision="v9", progress=False)
    with pytest.raises(ModelNotFound, match="no model 'acme/nope'") as info:
        pull("acme/nope", progress=False)
    assert "hf auth login" in info.value.hint


def test_bin_only_repos_are_converted(hub: tuple[FakeHub, str], tmp_path: Path) -> None:
    fake, _ = hub
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(32, 8, generator=g)
    sd = {
        "model.embed_tokens.weight": emb,
        "lm_head.weight": emb,
        "model.norm.weight": torch.randn(8, generator=g),
    }
    torch.save(sd, tmp_path / "pytorch_model.bin")
    fake.add(
        "acme/old",
        {
            "pytorch_model.bin": (tmp_path / "pytorch_model.bin").read_bytes(),
            "training_args.bin": b"pickled trainer state",
            "config.json": b'{"architectures": ["LlamaForCausalLM"]}',
        },
    )
    result = pull("acme/old", progress=False)
    assert fake.fetched() == ["config.json", "pytorch_model.bin"]
    assert sorted(p.name for p in result.path.iterdir()) == [
        "config.json",
        "flash-manifest.json",
        "model.safetensors",
    ]
    assert_same(load_file(result.path / "model.safetensors"), sd)


def test_a_failed_download_keeps_finished_files_for_the_next_pull(
    hub: tuple[FakeHub, str], qwen3_dir: Path
) -> None:
    fake, _ = hub
    fake.add("acme/tiny", _tiny_repo(qwen3_dir))
    shards = sorted(n for n in _files(qwen3_dir) if n.endswith(".safetensors"))
    fake.missing.add(shards[-1])
    with pytest.raises(PullError, match="could not be downloaded"):
        pull("acme/tiny", progress=False)
    assert not (StoreLayout.current().models / "acme" / "tiny").exists()
    assert [p.name for p in StoreLayout.current().tmp.iterdir()] == ["acme+tiny@download"]

    fake.missing.clear()
    fake.log.clear()
    pull("acme/tiny", progress=False)
    assert fake.fetched() == [shards[-1]]  # everything else came from the first try
    verify("acme/tiny")


def test_not_enough_disk_for_the_download(
    hub: tuple[FakeHub, str], qwen3_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flashtensors.store import sources

    fake, _ = hub
    fake.add("acme/tiny", _tiny_repo(qwen3_dir))
    monkeypatch.setattr(sources.fsutil, "free_bytes", lambda _path: 10_000)
    with pytest.raises(StoreError, match="disk full: storing acme/tiny needs .* free 0.1 GB"):
        pull("acme/tiny", progress=False)
    assert sorted(StoreLayout.current().tmp.iterdir()) == []
    assert not any(p.endswith(".safetensors") for p in fake.fetched())


def test_flash_pull_in_a_subprocess_reads_hf_endpoint(
    hub: tuple[FakeHub, str], qwen3_dir: Path, tmp_path: Path
) -> None:
    fake, url = hub
    fake.add("acme/tiny", _tiny_repo(qwen3_dir))
    env = {
        **os.environ,
        "HF_ENDPOINT": url,
        "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
        "FLASH_HOME": str(tmp_path / "home"),
    }
    env.pop("HF_HUB_OFFLINE", None)
    flash = Path(sys.executable).with_name("flash")
    proc = subprocess.run(
        [str(flash), "pull", "acme/tiny"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.strip().splitlines()
    assert line.startswith("pulled 'acme/tiny' (") and line.endswith(
        f"into {tmp_path / 'home/models/acme/tiny'}"
    )
    for shard in (n for n in _files(qwen3_dir) if n.endswith(".safetensors")):
        assert f"downloaded {shard} (" in proc.stderr
        assert f"hashed {shard} (" in proc.stderr
    assert "\r" not in proc.stderr  # not a terminal: lines, no bars
