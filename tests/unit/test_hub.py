"""Hugging Face Hub ids as ``--model``: resolution through a cache folder laid out by hand in the Hub's layout
(``models--org--name/{blobs,snapshots/<commit>,refs}``), the full export from a hub id with the network refused,
the offline and malformed-id refusals, the files a download may fetch, and the Hub's refusals. No network."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from slm_export.cli import main
from slm_export.errors import ConfigError
from slm_export.models import hub
from slm_export.models.builtin import BUILTIN_MODELS
from slm_export.models.hub import HubId, parse_hub_id, resolve_hub_id

QUICK = ["--target", "host", "--precision", "fp32", "--eval-windows", "1", "--timing-tokens", "4", "--threads", "1"]
EFFORT = ["--eval-windows", "1", "--timing-tokens", "4", "--threads", "1"]
COMMIT_A = "a" * 40  # refs/main
COMMIT_B = "b" * 39 + "1"  # refs/dev: other weights
REPO = "org/tiny"


def _run(argv: list[Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def lay_out(cache: Path, repo_id: str, snapshots: dict[str, Path], refs: dict[str, str]) -> Path:
    """``repo_id`` in the Hub's cache layout: each file a blob named by its hash, each snapshot's file a relative
    link to its blob, each ref a file holding its commit (no newline, as the Hub writes it)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for commit, source in snapshots.items():
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in sorted(p for p in source.iterdir() if p.is_file()):
            data = f.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    for ref, commit in refs.items():
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return repo


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two versions of one tiny llama: ``a`` as made, ``b`` with its weights scaled (another fingerprint)."""
    from safetensors.torch import load_file, save_file

    from tests.conftest import make_tiny_model

    root = tmp_path_factory.mktemp("hub-src")
    a = make_tiny_model("llama", root / "a")
    b = root / "b"
    shutil.copytree(a, b)
    save_file({k: v * 1.01 for k, v in load_file(b / "model.safetensors").items()}, b / "model.safetensors",
              metadata={"format": "pt"})
    return {"a": a, "b": b}


@pytest.fixture
def cache(tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache holding ``org/tiny`` (main -> A, dev -> B), selected through HF_HUB_CACHE, offline; the working
    folder an empty one, so that no relative path spells the hub id."""
    folder = tmp_path / "hf-cache"
    lay_out(folder, REPO, {COMMIT_A: tiny["a"], COMMIT_B: tiny["b"]}, {"main": COMMIT_A, "dev": COMMIT_B})
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return folder


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every way out refused and recorded: the Hub's download functions, name lookups, internet sockets."""
    import huggingface_hub

    tried: list[str] = []

    def refuse(what: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            tried.append(f"{what}{args[:2]}")
            raise AssertionError(f"network used: {what}{args[:2]}")
        return call

    for name in ("snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, refuse(name))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse("connect")(address)
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return tried


# -- resolution -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("ref", "commit"), [(REPO, COMMIT_A), (f"{REPO}@main", COMMIT_A), (f"{REPO}@dev", COMMIT_B),
                                             (f"{REPO}@{COMMIT_B}", COMMIT_B), (f"{REPO}@{COMMIT_A}", COMMIT_A)])
def test_resolves_id_branch_and_commit_from_the_cache(cache: Path, no_network: list[str], ref: str,
                                                      commit: str) -> None:
    hub_id = parse_hub_id(ref)
    assert hub_id is not None
    source = resolve_hub_id(hub_id)
    assert (source.repo_id, source.commit, source.downloaded) == (REPO, commit, False)
    assert Path(source.path) == cache / "models--org--tiny" / "snapshots" / commit
    assert source.revision == (ref.partition("@")[2] or "main")
    assert source.ref == f"{REPO}@{commit}"
    assert not no_network


def test_unknown_branch_offline_names_repo_revision_and_cache(cache: Path, no_network: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_hub_id(HubId(REPO, "nope"))
    text = str(err.value)
    assert f"{REPO} at revision nope is not in the Hub cache {cache}" in text
    assert "HF_HUB_OFFLINE=1" in text
    assert f"hf download {REPO} --revision nope" in text
    assert not no_network


def test_incomplete_snapshot_offline_says_what_it_lacks(cache: Path, no_network: list[str]) -> None:
    (cache / "models--org--tiny" / "snapshots" / COMMIT_B / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"commit b+1\) is incomplete .* lacks \*\.safetensors weights"):
        resolve_hub_id(HubId(REPO, "dev"))
    assert resolve_hub_id(HubId(REPO)).commit == COMMIT_A  # main's snapshot is whole


def test_local_folder_of_the_same_spelling_wins(cache: Path, tiny: dict[str, Path], no_network: list[str]) -> None:
    from slm_export.models import load_model

    shutil.copytree(tiny["b"], Path("org/tiny"))  # relative to the empty working folder
    assert parse_hub_id(REPO) is None
    model = load_model(REPO)
    assert model.hub is None
    assert Path(model.path).resolve() == (Path.cwd() / "org/tiny").resolve()
    from_hub = load_model(f"{REPO}@main")  # a spelling no folder has: the cache's main (A, other weights)
    assert from_hub.hub is not None
    assert from_hub.hub.commit == COMMIT_A
    assert from_hub.fingerprint != model.fingerprint
    assert not no_network


def test_builtin_names_and_paths_are_not_hub_ids() -> None:
    for name in BUILTIN_MODELS.names():
        assert parse_hub_id(name) is None
    for path in ("/no/such/model", "./no/such", "~/models/x", "nowhere/model.gguf", "plainname", Path("org/x")):
        assert parse_hub_id(path) is None


# -- the CLI ------------------------------------------------------------------------------------------------------

def test_cli_export_from_hub_id_records_repo_and_commit(cache: Path, tmp_path: Path, no_network: list[str],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "art"
    code, text = _run([*QUICK, "--model", f"{REPO}@dev", "--out", out], capsys)
    assert code == 0, text
    manifest = json.loads((out / "artifact.json").read_text())
    assert manifest["hub"] == {"repo_id": REPO, "revision": "dev", "commit": COMMIT_B}
    assert manifest["source_model"] == f"{REPO}@{COMMIT_B}"
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["hub"] == manifest["hub"]
    assert report["model"]["name"] == REPO
    assert report["model"]["path"] == str(cache / "models--org--tiny" / "snapshots" / COMMIT_B)
    # dev moves to A's weights: validate still loads the commit the artifact was made from
    (cache / "models--org--tiny" / "refs" / "dev").write_text(COMMIT_A)
    code, text = _run(["validate", out, *EFFORT], capsys)
    assert code == 0, text
    assert json.loads((out / "report.json").read_text())["model"]["hub"]["commit"] == COMMIT_B
    assert not no_network


def test_cli_offline_and_not_cached_exits_2(cache: Path, tmp_path: Path, no_network: list[str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "art"
    code, text = _run([*QUICK, "--model", "other/model@v1", "--out", out], capsys)
    assert code == 2, text
    assert f"other/model at revision v1 is not in the Hub cache {cache}" in text
    assert "HF_HUB_OFFLINE=1 forbids downloads" in text
    assert "hf download other/model --revision v1" in text
    assert not out.exists()
    assert not no_network


@pytest.mark.parametrize(("ref", "reason"), [
    ("org/ti ny", "contains whitespace"), ("org/../tiny", "contains '..'"), ("a/b/c", "has more than one '/'"),
    (f"{REPO}@", "the revision after '@' is empty"), ("org/", "the organisation or the name is empty"),
    ("tiny@main", "needs an organisation"), (f"{REPO}@dev branch", "contains whitespace"),
    ("org/ti--ny", "Cannot have -- or .."),
])
def test_cli_malformed_id_exits_2_before_any_work(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str], ref: str, reason: str) -> None:
    monkeypatch.setattr("slm_export.models.loader.resolve_hub_id", lambda *a: pytest.fail("resolved a malformed id"))
    monkeypatch.setattr("slm_export.pipeline.run", lambda *a, **k: pytest.fail("ran a malformed id"))
    out = tmp_path / "art"
    code, text = _run([*QUICK, "--model", ref, "--out", out], capsys)
    assert code == 2, text
    assert "not a valid hub id (org/name[@revision])" in text
    assert reason in text
    assert not out.exists()


# -- downloads (the Hub simulated by a stand-in for snapshot_download) ---------------------------------------------

def fake_hub(files: dict[str, Path], commit: str, cache: Path, fetched: list[str]) -> Callable[..., str]:
    """A ``snapshot_download`` serving ``files`` (repo path -> source file) at ``commit`` through the library's own
    pattern filter; it records every file it writes."""
    from huggingface_hub.utils import filter_repo_objects

    def download(repo_id: str, *, revision: str, cache_dir: str, allow_patterns: list[str],
                 ignore_patterns: list[str], **_: Any) -> str:
        assert Path(cache_dir) == cache
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        snap = repo / "snapshots" / commit
        for name in filter_repo_objects(sorted(files), allow_patterns=allow_patterns,
                                        ignore_patterns=ignore_patterns):
            (snap / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files[name], snap / name)
            fetched.append(name)
        if revision != commit:
            (repo / "refs" / revision).parent.mkdir(parents=True, exist_ok=True)
            (repo / "refs" / revision).write_text(commit)
        return str(snap)

    return download


@pytest.mark.parametrize("indexed", [True, False])
def test_download_fetches_only_what_the_export_reads(tiny: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, indexed: bool) -> None:
    """The repository also holds pickled, GGUF and ONNX copies, Mistral's consolidated file and a subfolder's
    safetensors: none is fetched. With an index, only the shards it names."""
    import huggingface_hub
    from safetensors import safe_open

    src = tiny["a"]
    weights = tmp_path / ("model-00001-of-00001.safetensors" if indexed else "model.safetensors")
    shutil.copyfile(src / "model.safetensors", weights)
    files = {p.name: p for p in src.iterdir() if p.name != "model.safetensors"} | {weights.name: weights}
    wanted = set(files)
    if indexed:
        with safe_open(weights, "pt") as fh:
            index = {"metadata": {}, "weight_map": dict.fromkeys(fh.keys(), weights.name)}
        (tmp_path / "index.json").write_text(json.dumps(index))
        files |= {hub.INDEX: tmp_path / "index.json", "model-extra.safetensors": weights}
        wanted.add(hub.INDEX)
    files |= {"consolidated.safetensors": weights, "pytorch_model.bin": weights, "model.gguf": weights,
              "model.onnx": weights, "onnx/model.safetensors": weights, "original/params.pt": weights,
              "README.md": weights}
    cache = tmp_path / "cache"
    fetched: list[str] = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub(files, COMMIT_A, cache, fetched))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    source = resolve_hub_id(HubId(REPO))
    assert (source.commit, source.downloaded) == (COMMIT_A, True)
    assert sorted(fetched) == sorted(wanted)
    # cached now: a second resolution, offline, asks nothing
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_hub_id(HubId(REPO)).downloaded is False


def _http_error(cls: type[Exception], status: int) -> Exception:
    import httpx2

    response = httpx2.Response(status, request=httpx2.Request("GET", "http://127.0.0.1/api/models/org/tiny"))
    return cls("refused", response=response)  # type: ignore[call-arg]


@pytest.mark.parametrize(("make", "expected"), [
    (lambda e: _http_error(e.GatedRepoError, 403), "org/private is gated: accept its terms"),
    (lambda e: _http_error(e.RepositoryNotFoundError, 404), "org/private was not found on the Hub"),
    (lambda e: _http_error(e.RevisionNotFoundError, 404), "revision 'v9' was not found in org/private"),
    (lambda e: _http_error(e.HfHubHTTPError, 401), "refused access to org/private (HTTP 401)"),
    (lambda e: e.LocalEntryNotFoundError("connection failed"), "the Hub cannot be reached"),
])
def test_hub_refusals_exit_2_without_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str], make: Callable[[Any], Exception],
                                              expected: str) -> None:
    import huggingface_hub
    from huggingface_hub import errors

    def download(*args: Any, **kwargs: Any) -> str:
        raise make(errors)

    secret = "hf_" + "x7Q" * 10
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    code, text = _run([*QUICK, "--model", "org/private@v9", "--out", tmp_path / "art"], capsys)
    assert code == 2, text
    assert expected in text
    assert secret not in text
    if "gated" in expected or "HTTP 401" in expected:
        assert "HF_TOKEN is set" in text
