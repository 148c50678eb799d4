"""Calibration samples: token windows drawn (seeded) from the built-in calibration half, a text or
JSONL file, or a ``datasets`` folder saved with ``save_to_disk``. Disjoint from the evaluation half.

With an accuracy budget (``--max-ppl-increase``) the source's token stream is cut in two: the samples
are drawn from the head, and the budget's search measures perplexity on the tail (``split_calibration``),
so it fits its choice on text that neither calibrated the weights nor is the evaluation text."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slm_export.errors import ConfigError
from slm_export.text import check_text_input

# The held-out tail: as many tokens as validation's default 8 x 512 windows, but at most a quarter of the
# text (the samples keep most of it), and never under 256 tokens (fewer rank the budget's choices by noise).
HELDOUT_WINDOWS, HELDOUT_LEN = 8, 512
HELDOUT_FRACTION = 0.25
HELDOUT_MIN = 256


@dataclass(frozen=True)
class CalibrationSet:
    """``ids`` [samples, seqlen]; recorded in the report by source, count and hash. ``heldout_tokens``: how
    many tokens at the end of the source were held out for the budget (0: none, samples from all of it)."""

    source: str
    ids: np.ndarray
    seed: int
    heldout_tokens: int = 0

    @property
    def tokens(self) -> int:
        return int(self.ids.size)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.ids.astype(np.int64).tobytes()).hexdigest()

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"source": self.source, "samples": int(self.ids.shape[0]),
                                  "seqlen": int(self.ids.shape[1]), "tokens": self.tokens, "seed": self.seed,
                                  "sha256": self.sha256}
        if self.heldout_tokens:
            out["heldout_tokens"] = self.heldout_tokens
        return out


@dataclass(frozen=True)
class CalibrationSplit:
    """A calibration source's token stream cut in two: samples come from ``ids[:heldout_start]``, the
    budget's windows from ``ids[heldout_start:]``."""

    source: str
    ids: np.ndarray
    heldout_start: int

    @property
    def heldout(self) -> np.ndarray:
        return self.ids[self.heldout_start:]

    def windows(self, n_windows: int = HELDOUT_WINDOWS, length: int = HELDOUT_LEN) -> list[list[int]]:
        """Consecutive, disjoint windows from the start of the held-out part (one shorter window when it
        holds less than one), as ``token_windows`` cuts the evaluation text."""
        ids = self.heldout.tolist()
        if len(ids) < length + 1:
            return [ids]
        return [ids[i * length:(i + 1) * length] for i in range(min(n_windows, len(ids) // length))]

    def samples(self, samples: int, seqlen: int, seed: int = 0) -> CalibrationSet:
        """``samples`` windows of ``seqlen`` tokens at seeded offsets in the head, never reaching the tail."""
        return _draw(self.source, self.ids[:self.heldout_start], samples, seqlen, seed, int(self.heldout.size))

    def describe_heldout(self) -> dict[str, object]:
        held = self.heldout
        return {"source": f"{self.source}, its last {held.size} tokens (held out from calibration)",
                "tokens": int(held.size), "first_token": self.heldout_start, "total_tokens": int(self.ids.size),
                "sha256": hashlib.sha256(held.astype(np.int64).tobytes()).hexdigest()}


def _tokens(tokenizer, path: str | None) -> tuple[str, np.ndarray]:  # type: ignore[no-untyped-def]
    source = check_text_input(path, "calibration")
    return source.name, np.asarray(tokenizer(source.text, add_special_tokens=False).input_ids, dtype=np.int64)


def heldout_size(total: int) -> int:
    """How many tokens at the end of a ``total``-token calibration source the budget holds out."""
    return min(HELDOUT_WINDOWS * HELDOUT_LEN, int(total * HELDOUT_FRACTION))


def _split_point(name: str, total: int, seqlen: int) -> int:
    """Where the held-out tail starts; a ``ConfigError`` when the text cannot hold both parts."""
    def fits(n: int) -> bool:
        return heldout_size(n) >= HELDOUT_MIN and n - heldout_size(n) >= seqlen + 1

    if not fits(total):
        need = HELDOUT_MIN
        while not fits(need):
            need += 1
        raise ConfigError(f"calibration data {name} has {total} tokens, too few for both calibration samples of "
                          f"{seqlen} tokens and the held-out part that --max-ppl-increase fits its choice on (the "
                          f"last quarter of the text, at least {HELDOUT_MIN} tokens): it needs at least {need} "
                          "tokens; give more text (--calib-data) or a smaller --calib-seqlen")
    return total - heldout_size(total)


def split_calibration(tokenizer, path: str | None, seqlen: int) -> CalibrationSplit:  # type: ignore[no-untyped-def]
    """The calibration source cut into a head for samples of ``seqlen`` tokens and a held-out tail."""
    name, ids = _tokens(tokenizer, path)
    return CalibrationSplit(name, ids, _split_point(name, int(ids.size), seqlen))


def load_calibration(tokenizer, path: str | None, samples: int, seqlen: int, seed: int = 0,  # type: ignore[no-untyped-def]
                     holdout: bool = False) -> CalibrationSet:
    """Tokenize the source once and draw ``samples`` windows of ``seqlen`` tokens at seeded offsets.
    ``holdout``: draw them from the head only, leaving ``split_calibration``'s tail to the budget."""
    _check_shape(samples, seqlen)
    if holdout:
        return split_calibration(tokenizer, path, seqlen).samples(samples, seqlen, seed)
    return _draw(*_tokens(tokenizer, path), samples, seqlen, seed, 0)


def _check_shape(samples: int, seqlen: int) -> None:
    if samples < 1 or seqlen < 8:
        raise ConfigError(f"calibration needs at least 1 sample of at least 8 tokens (got {samples} x {seqlen})")


def _draw(name: str, ids: np.ndarray, samples: int, seqlen: int, seed: int, heldout: int) -> CalibrationSet:
    _check_shape(samples, seqlen)
    if ids.size < seqlen + 1:
        raise ConfigError(f"calibration data {name} has {ids.size} tokens, fewer than one sample of "
                          f"{seqlen}; give more text or a smaller --calib-seqlen")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, ids.size - seqlen, size=samples)
    return CalibrationSet(name, np.stack([ids[s:s + seqlen] for s in starts]), seed, heldout)


def check_budget_sources(calib_data: str | None, eval_data: str | None) -> None:
    """The budget fits on held-out calibration text and validation then measures the evaluation text: one
    file given as both would make the figure the budget chose for the one the report states."""
    if calib_data is None or eval_data is None:
        return  # the built-in halves, or a user file beside a built-in half: disjoint
    a, b = Path(calib_data), Path(eval_data)
    if not (a.is_file() and b.is_file()):
        return
    same = a.samefile(b) or (a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes())
    if same:
        raise ConfigError(f"--calib-data {calib_data} and --eval-data {eval_data} hold the same text: "
                          "--max-ppl-increase fits its choice on held-out calibration text and the report states "
                          "the evaluation text's figure, so give them different texts")
