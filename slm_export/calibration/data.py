"""Calibration samples: token windows drawn (seeded) from the built-in calibration half, a text or
JSONL file, or a ``datasets`` folder saved with ``save_to_disk``. Disjoint from the evaluation half."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slm_export.errors import ConfigError
from slm_export.validation.text import TextSource, load_text


@dataclass(frozen=True)
class CalibrationSet:
    """``ids`` [samples, seqlen]; recorded in the report by source, count and hash."""

    source: str
    ids: np.ndarray
    seed: int

    @property
    def tokens(self) -> int:
        return int(self.ids.size)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.ids.astype(np.int64).tobytes()).hexdigest()

    def describe(self) -> dict[str, object]:
        return {"source": self.source, "samples": int(self.ids.shape[0]), "seqlen": int(self.ids.shape[1]),
                "tokens": self.tokens, "seed": self.seed, "sha256": self.sha256}


def _datasets_folder(path: Path) -> TextSource:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{path} looks like a `datasets` folder; install the package to read it: "
                          "pip install datasets") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[next(iter(ds))]
    if "text" not in ds.column_names:
        raise ConfigError(f"{path}: the dataset has no \"text\" column (columns: {', '.join(ds.column_names)})")
    return TextSource(str(path), "\n\n".join(t for t in ds["text"] if isinstance(t, str)))


def load_calibration(tokenizer, path: str | None, samples: int, seqlen: int, seed: int = 0) -> CalibrationSet:  # type: ignore[no-untyped-def]
    """Tokenize the source once and draw ``samples`` windows of ``seqlen`` tokens at seeded offsets."""
    if samples < 1 or seqlen < 8:
        raise ConfigError(f"calibration needs at least 1 sample of at least 8 tokens (got {samples} x {seqlen})")
    p = Path(path) if path else None
    source = _datasets_folder(p) if p is not None and p.is_dir() else load_text(path, "calibration")
    ids = np.asarray(tokenizer(source.text, add_special_tokens=False).input_ids, dtype=np.int64)
    if ids.size < seqlen + 1:
        raise ConfigError(f"calibration data {source.name} has {ids.size} tokens, fewer than one sample of "
                          f"{seqlen}; give more text or a smaller --calib-seqlen")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, ids.size - seqlen, size=samples)
    return CalibrationSet(source.name, np.stack([ids[s:s + seqlen] for s in starts]), seed)
