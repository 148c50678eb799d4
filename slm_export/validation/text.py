"""Evaluation and calibration text: Python's bundled documentation, or the user's own file.

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


def load_text(path: str | None, part: str = "evaluation") -> TextSource:
    """The built-in split when ``path`` is None, else a UTF-8 text file or JSONL with a "text" field."""
    if path is None:
        return builtin_split(part)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{part} data {path}: no such file")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{part} data {path} is not UTF-8 text (byte {exc.start}); re-encode it as UTF-8") from None
    if p.suffix.lower() in (".jsonl", ".json"):
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
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise ConfigError(f"{part} data {path} is empty")
    return TextSource(str(p), raw)


def token_windows(tokenizer, source: TextSource, n_windows: int, length: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Up to ``n_windows`` consecutive, disjoint windows of ``length`` tokens from the start of the text."""
    ids = tokenizer(source.text, add_special_tokens=False).input_ids
    if len(ids) < length + 1:
        if len(ids) < 16:
            raise ConfigError(f"{source.name} has only {len(ids)} tokens; evaluation needs at least 16")
        return [ids]
    count = min(n_windows, len(ids) // length)
    return [ids[i * length:(i + 1) * length] for i in range(count)]
