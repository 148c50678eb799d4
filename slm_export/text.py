"""Evaluation and calibration text: Python's bundled documentation, the user's own file, or (calibration) a
``datasets`` folder. Read by both the compress stage (calibration samples) and validation (evaluation windows).

``pydoc_data.topics`` is split deterministically by sorted topic name: the first half is for
calibration, the second half for evaluation, so the two never share a sentence.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from slm_export.errors import ConfigError

BUILTIN = "builtin:pydoc-topics"


@dataclass(frozen=True)
class TextSource:
    """Text plus where it came from (recorded in the report)."""

    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def builtin_split(part: str) -> TextSource:
    """``part`` is "calibration" (first half of sorted topics) or "evaluation" (second half)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    half = len(keys) // 2
    chosen = keys[:half] if part == "calibration" else keys[half:]
    return TextSource(f"{BUILTIN}/{part}", "\n\n".join(topics[k] for k in chosen))


DATASETS_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")  # what save_to_disk writes
MIN_TOKENS = 16  # fewer next tokens than this measure nothing: one window must hold at least this many


def check_text_input(path: str | None, part: str = "evaluation") -> TextSource:
    """The text at ``path`` after the checks that need no tokenizer, each failure a ``ConfigError``: it exists,
    is a file (for "calibration", a ``datasets`` folder saved with ``save_to_disk`` too), is UTF-8 text
    without NUL bytes, is not empty or whitespace only, and a JSONL file's lines are objects with a "text"
    string. None: the built-in split of ``part``."""
    if path is None:
        return builtin_split(part)
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{part} data {path}: no such file")
    if p.is_dir():
        return _folder_text(p, path, part)
    if not p.is_file():
        raise ConfigError(f"{part} data {path} is not a regular file")
    raw = _file_text(p, path, part)
    if p.suffix.lower() in (".jsonl", ".json"):
        raw = _jsonl_text(raw, path, part)
        if not raw.strip():
            raise ConfigError(f"{part} data {path}: every line's \"text\" is empty")
    return TextSource(str(p), raw)


def _folder_text(p: Path, path: str, part: str) -> TextSource:
    """A folder is text only as calibration data saved by ``datasets``."""
    if part == "calibration" and any((p / m).is_file() for m in DATASETS_MARKERS):
        source = datasets_folder(p)
        if not source.text.strip():
            raise ConfigError(f"{part} data {path}: the dataset's \"text\" column holds no text")
        return source
    hint = (" (a `datasets` folder saved with save_to_disk holds " + ", ".join(DATASETS_MARKERS[:-1]) +
            f" or {DATASETS_MARKERS[-1]}; this one holds none)") if part == "calibration" else ""
    raise ConfigError(f"{part} data {path} is a folder, not a text or JSONL file{hint}")


def _file_text(p: Path, path: str, part: str) -> str:
    """A file's bytes as text: readable, UTF-8, no NUL byte, not empty or whitespace only."""
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{part} data {path}: cannot read it ({exc.strerror})") from None
    nul = data.find(b"\0")
    try:
        # Universal newlines, as Path.read_text gives: the calibration ids stay those of earlier versions.
        raw = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        bad = -1
    except UnicodeDecodeError as exc:
        bad = exc.start
    if nul >= 0 and (bad < 0 or nul < bad):
        raise ConfigError(f"{part} data {path} is binary, not text: byte {nul} is NUL (0x00); give a UTF-8 text "
                          "or JSONL file")
    if bad >= 0:
        raise ConfigError(f"{part} data {path} is not UTF-8 text: byte {bad} (0x{data[bad]:02x}) is not valid "
                          "UTF-8; re-encode it as UTF-8")
    if not data:
        raise ConfigError(f"{part} data {path} is empty")
    if not raw.strip():
        raise ConfigError(f"{part} data {path} holds only whitespace")
    return raw


def datasets_folder(path: Path) -> TextSource:
    """The "text" column of a ``datasets`` folder saved with ``save_to_disk`` (a dict's first split)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{path} looks like a `datasets` folder; install the package to read it: "
                          "pip install datasets") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # the package's own errors vary by version: a broken folder is the user's input
        raise ConfigError(f"calibration data {path}: cannot read it as a `datasets` folder ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[next(iter(ds))]
    if "text" not in ds.column_names:
        raise ConfigError(f"{path}: the dataset has no \"text\" column (columns: {', '.join(ds.column_names)})")
    return TextSource(str(path), "\n\n".join(t for t in ds["text"] if isinstance(t, str)))


def _jsonl_text(raw: str, path: str, part: str) -> str:
    """The "text" fields of a JSONL file's lines, blank lines skipped, joined by blank lines."""
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{part} data {path}, line {n}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ConfigError(f"{part} data {path}, line {n}: expected an object with a \"text\" string")
        texts.append(row["text"])
    return "\n\n".join(texts)


def load_text(path: str | None, part: str = "evaluation") -> TextSource:
    """The built-in split when ``path`` is None, else a UTF-8 text file or JSONL with a "text" field
    (``check_text_input``'s checks)."""
    return check_text_input(path, part)


def check_token_count(tokenizer, source: TextSource, windows: int, length: int,  # type: ignore[no-untyped-def]
                      part: str = "evaluation") -> str | None:
    """Refuse (``ConfigError``) a text shorter than one window of ``MIN_TOKENS`` tokens, as ``token_windows``
    would, but before any work. Returns None when the text fills the ``windows`` x ``length`` tokens asked,
    else a note for the report saying how much of them it holds (``token_windows`` then measures fewer)."""
    n = len(tokenizer(source.text, add_special_tokens=False).input_ids)
    if n < MIN_TOKENS:
        raise ConfigError(f"{part} data {source.name} has {n} tokens; one window needs at least {MIN_TOKENS} "
                          f"(the {windows} x {length}-token windows asked need {windows * length}); give more text")
    got = [n] if n < length + 1 else [length] * min(windows, n // length)
    if len(got) == windows and got[0] == length:
        return None
    return (f"{part} data {source.name} has {n} tokens, fewer than the {windows} x {length} asked: "
            f"{len(got)} window(s) of {got[0]} tokens are measured")


def token_windows(tokenizer, source: TextSource, n_windows: int, length: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Up to ``n_windows`` consecutive, disjoint windows of ``length`` tokens from the start of the text."""
    ids = tokenizer(source.text, add_special_tokens=False).input_ids
    if len(ids) < length + 1:
        if len(ids) < MIN_TOKENS:
            raise ConfigError(f"{source.name} has only {len(ids)} tokens; evaluation needs at least {MIN_TOKENS}")
        return [ids]
    count = min(n_windows, len(ids) // length)
    return [ids[i * length:(i + 1) * length] for i in range(count)]
