"""Hugging Face Hub ids as models: ``org/name`` or ``org/name@revision`` (a branch, tag or commit) resolved to a
snapshot folder of the Hub's local cache, the folder the loader then reads like any other.

The cache comes first: a snapshot holding what an export reads is used without asking the network. Otherwise,
when the network is allowed (``HF_HUB_OFFLINE`` unset), only those files are downloaded: the configs, the
tokenizer, the safetensors weights and their index; never pickled weights (``*.bin``, ``*.pt``), GGUF or ONNX
files, nor anything in a subfolder. ``HF_TOKEN`` is left to huggingface_hub, which sends it for gated and private
repositories; no message here ever holds its value.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slm_export.errors import ConfigError, ModelLoadError
from slm_export.models.checks import TOKENIZER_FILES, TOKENIZER_PAIRS

log = logging.getLogger(__name__)

HUB_ID = "org/name[@revision]"
INDEX = "model.safetensors.index.json"
# What an export reads besides the weights: the configs, the safetensors index, every tokenizer file kind.
META_FILES = ("config.json", "generation_config.json", INDEX, "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "chat_template.jinja", "chat_template.json", *TOKENIZER_FILES,
              *(f for pair in TOKENIZER_PAIRS for f in pair))
# Never fetched, whatever the allow list says: pickled weights run code when read, and the other formats (Mistral's
# consolidated file among them) are copies the loader does not read; "*/*" keeps to the repository's top folder
# (patterns match across "/").
NEVER = ("*/*", "consolidated*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.gguf", "*.onnx",
         "*.onnx_data", "*.ort", "*.h5", "*.msgpack", "*.tflite")
_TRUE = ("1", "ON", "YES", "TRUE")  # huggingface_hub's spelling of a true environment flag
_PATHLIKE = ("/", "./", "../", "~", ".\\")
_REVISION = re.compile(r"[\w.\-/]+")


@dataclass(frozen=True)
class HubId:
    """A repository and the revision asked for (``None``: the default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class HubSource:
    """Where a hub id resolved: the snapshot folder and the commit it holds."""

    repo_id: str
    revision: str  # as asked: a branch, tag or commit ("main" when none was given)
    commit: str
    path: str
    downloaded: bool  # whether this run fetched files (False: the cache held them all)

    @property
    def ref(self) -> str:
        """The id pinned to the commit: what ``validate`` loads again, whatever the branch says by then."""
        return f"{self.repo_id}@{self.commit}"

    def to_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit}


def parse_hub_id(ref: str | os.PathLike[str]) -> HubId | None:
    """The hub id ``ref`` spells, or ``None`` when it is a path (existing, or written as one) or has no ``/``.

    Raises:
        ConfigError: ``ref`` is meant as a hub id but malformed; the message says why.
    """
    if not isinstance(ref, str):  # a Path object (the Python API) is a path, never an id
        return None
    if os.path.exists(ref) or ref.startswith(_PATHLIKE) or "\\" in ref or ref.lower().endswith(".gguf"):
        return None
    if "/" not in ref and "@" not in ref:
        return None
    reason = _malformed(ref)
    if reason:
        raise ConfigError(f"model {ref!r} is not a file or folder, not a built-in model, and not a valid hub id "
                          f"({HUB_ID}): {reason}")
    repo_id, _, revision = ref.partition("@")
    return HubId(repo_id, revision or None)


def _malformed(ref: str) -> str | None:
    if any(c.isspace() for c in ref):
        return "it contains whitespace"
    if ".." in ref:
        return "it contains '..'"
    repo_id, at, revision = ref.partition("@")
    if at and not revision:
        return "the revision after '@' is empty"
    if repo_id.count("/") > 1:
        return f"{repo_id!r} has more than one '/'"
    org, slash, name = repo_id.partition("/")
    if not slash:
        return f"{repo_id!r} needs an organisation or user before its name (org/name)"
    if not org or not name:
        return "the organisation or the name is empty"
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        return str(exc)
    if revision and (not _REVISION.fullmatch(revision) or revision.startswith("/") or revision.endswith("/")
                     or "//" in revision):
        return f"revision {revision!r} may hold only letters, digits, '.', '_', '-' and single inner '/'"
    return None


def cache_dir() -> Path:
    """The Hub's cache folder, found as huggingface_hub finds it, but read now: its own constants are read once,
    when it is first imported."""
    env = os.environ
    folder = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not folder:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        folder = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(folder)))


def offline_reason() -> str | None:
    """Why the network may not be used (the variable that says so), or ``None``."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").upper() in _TRUE:
            return f"{var}={os.environ[var]} forbids downloads"
    return None


def resolve_hub_id(hub_id: HubId) -> HubSource:
    """The snapshot folder of ``hub_id``: the cache's when it holds what an export reads, else downloaded.

    Raises:
        ConfigError: not cached and offline (or the Hub unreachable); gated, private, unknown repository or
            revision.
        ModelLoadError: the repository lacks what an export reads (no safetensors weights, no tokenizer).
    """
    cache = cache_dir()
    revision = hub_id.revision or "main"
    cached = cached_snapshot(hub_id.repo_id, revision, cache)
    lacking = missing_files(cached) if cached is not None else ["everything"]
    if not lacking and cached is not None:
        return HubSource(hub_id.repo_id, revision, cached.name, str(cached), False)
    reason = offline_reason()
    if reason:
        raise ConfigError(not_cached_message(hub_id, cache, cached, lacking, reason))
    folder = _download(hub_id, revision, cache, cached, lacking)
    lacking = missing_files(folder)
    if lacking:
        raise ModelLoadError(f"{hub_id} at commit {folder.name} lacks {', '.join(lacking)}: an export needs "
                             "config.json, safetensors weights and tokenizer files (pickled *.bin weights are never "
                             "downloaded, since reading them can run code)")
    return HubSource(hub_id.repo_id, revision, folder.name, str(folder), True)


def cached_snapshot(repo_id: str, revision: str, cache: Path) -> Path | None:
    """The cache's snapshot folder for ``revision`` (a branch or tag through ``refs/``, or a commit), if any."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=str(cache), revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def missing_files(folder: Path) -> list[str]:
    """What ``folder`` lacks of what an export reads: config.json, the weights (each one the index names), a
    tokenizer."""
    lacking = [] if (folder / "config.json").is_file() else ["config.json"]
    index = folder / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            names = [f"{INDEX} (unreadable)"]
        lacking += [n for n in names if not (folder / n).is_file()]
    elif not any(p.is_file() for p in folder.glob("*.safetensors")):
        lacking.append("*.safetensors weights")
    has_tokenizer = any((folder / f).is_file() for f in TOKENIZER_FILES) or any(
        all((folder / f).is_file() for f in pair) for pair in TOKENIZER_PAIRS)
    if not has_tokenizer:
        lacking.append("tokenizer files")
    return lacking


def not_cached_message(hub_id: HubId, cache: Path, cached: Path | None, lacking: list[str], reason: str) -> str:
    """Which repository and revision the cache lacks, where it looked, and how to get them."""
    revision = hub_id.revision or "main"
    if cached is None:
        what = f"{hub_id.repo_id} at revision {revision} is not in the Hub cache {cache}"
    else:
        what = (f"{hub_id.repo_id} at revision {revision} (commit {cached.name}) is incomplete in the Hub cache "
                f"{cache}: it lacks {', '.join(lacking)}")
    pin = f" --revision {hub_id.revision}" if hub_id.revision else ""
    return (f"{what}, and {reason}. Get it on a machine with the network and HF_HUB_OFFLINE unset: run this again "
            f"there (with HF_TOKEN set for a gated or private model), or `hf download {hub_id.repo_id}{pin}` with "
            "HF_HUB_CACHE pointing at this cache; or pass the model's folder instead")


def _download(hub_id: HubId, revision: str, cache: Path, cached: Path | None, lacking: list[str]) -> Path:
    """Fetch the metadata, then the weights its index names (all top-level safetensors without an index), both
    at one commit so that a branch moving in between cannot mix two versions."""
    import huggingface_hub as hf

    log.info("downloading %s (%s) into %s", hub_id, ", ".join(lacking), cache)
    try:
        folder = Path(hf.snapshot_download(hub_id.repo_id, revision=revision, cache_dir=str(cache),
                                           allow_patterns=list(META_FILES), ignore_patterns=list(NEVER)))
        weights = _index_names(folder) or ["*.safetensors"]
        hf.snapshot_download(hub_id.repo_id, revision=folder.name, cache_dir=str(cache), allow_patterns=weights,
                             ignore_patterns=list(NEVER))
    except Exception as exc:
        mapped = hub_error(exc, hub_id, cache, cached, lacking)
        if mapped is None:
            raise
        raise mapped from None
    return folder


def _index_names(folder: Path) -> list[str]:
    try:
        return sorted(set(json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def hub_error(exc: Exception, hub_id: HubId, cache: Path, cached: Path | None,
              lacking: list[str]) -> ConfigError | ModelLoadError | None:
    """The user's error for what huggingface_hub raised (``None``: not one of its refusals)."""
    from huggingface_hub import errors

    token = "set" if os.environ.get("HF_TOKEN") else "not set"
    if isinstance(exc, errors.GatedRepoError):
        return ConfigError(f"{hub_id.repo_id} is gated: accept its terms on its page with your account, then set "
                           f"HF_TOKEN to a token of that account (HF_TOKEN is {token})")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return ConfigError(f"{hub_id.repo_id} was not found on the Hub: check its spelling; a private repository "
                           f"needs HF_TOKEN set to a token with access (HF_TOKEN is {token})")
    if isinstance(exc, errors.RevisionNotFoundError):
        return ConfigError(f"revision {hub_id.revision!r} was not found in {hub_id.repo_id}: name one of its "
                           "branches, tags or commits")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, errors.HfHubHTTPError) and status in (401, 403):
        return ConfigError(f"the Hub refused access to {hub_id.repo_id} (HTTP {status}): set HF_TOKEN to a token "
                           f"with access (HF_TOKEN is {token})")
    if isinstance(exc, errors.HfHubHTTPError):
        return ModelLoadError(f"the Hub failed to serve {hub_id} (HTTP {status}); try again later")
    unreachable = isinstance(exc, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, ConnectionError,
                                   TimeoutError)) or type(exc).__module__.startswith("httpx")
    if not unreachable:
        return None
    if isinstance(exc, errors.OfflineModeIsEnabled) or isinstance(exc.__cause__, errors.OfflineModeIsEnabled):
        why = "huggingface_hub is offline in this process (HF_HUB_OFFLINE was set when it was first imported)"
    else:
        why = f"the Hub cannot be reached ({type(exc).__name__})"
    return ConfigError(not_cached_message(hub_id, cache, cached, lacking, why))
