"""Accuracy metrics of an artifact against the PyTorch float32 reference."""

from __future__ import annotations

from typing import Any

import numpy as np

from slm_export.errors import NonFiniteOutput


def first_nonfinite(x: np.ndarray) -> tuple[int, ...] | None:
    """The index of the first NaN or Inf in ``x`` (C order), or None when every value is finite."""
    bad = ~np.isfinite(x)
    if not bad.any():
        return None
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), x.shape))


def check_finite(x: np.ndarray, whose: str, where: str, axes: tuple[str, ...] = ("position", "vocabulary index"),
                 window: int | None = None) -> None:
    """Raise ``NonFiniteOutput`` when ``x`` holds NaN or Inf: a perplexity, agreement or argmax taken over such
    values is meaningless (an all-NaN row's argmax is index 0, so two broken runs "agree"). ``whose``: the
    values' owner ("the artifact's logits"); ``where``: which run of which file; ``axes`` names x's dimensions."""
    x = np.asarray(x)
    at = first_nonfinite(x)
    if at is None:
        return
    value = x[at]
    count = int((~np.isfinite(x)).sum())
    pos = ", ".join(f"{name} {i}" for name, i in zip(axes, at, strict=False))
    win = f"window {window}, " if window is not None else ""
    raise NonFiniteOutput(f"{where}: {whose} hold {value} at {win}{pos} (counted from 0; {count} of {x.size} "
                          "values are NaN or Inf); no accuracy figure can be measured on them, so the artifact fails")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# Positions compared at a time: the float64 log-probabilities of a whole 512-token window over a 150k vocabulary
# would be several temporaries of 600 MB each, beside the runtime's session.
COMPARE_ROWS = 64


def compare_logits(ref: np.ndarray, art: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Sums over one window of [seq, vocab] logits: NLL of each, top-1 agreement, KL(ref || art); by blocks of
    ``COMPARE_ROWS`` positions (each sum is over positions)."""
    total: dict[str, float] = {}
    for i in range(0, len(targets), COMPARE_ROWS):
        rows = slice(i, i + COMPARE_ROWS)
        part = _compare_rows(ref[rows], art[rows], targets[rows])
        for k, v in part.items():
            total[k] = max(total.get(k, 0.0), v) if k == "max_abs" else total.get(k, 0.0) + v
    return total


def _compare_rows(ref: np.ndarray, art: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    lr, la = log_softmax(ref), log_softmax(art)
    idx = np.arange(len(targets))
    kl = (np.exp(lr) * (lr - la)).sum(-1)
    return {"nll_ref": float(-lr[idx, targets].sum()), "nll_art": float(-la[idx, targets].sum()),
            "agree": float((ref.argmax(-1) == art.argmax(-1)).sum()), "kl": float(kl.sum()),
            "n": float(len(targets)), "max_abs": float(np.abs(ref - art).max())}


def decoder_accuracy(reference: Any, artifact: Any, windows: list[list[int]], file: str = "the artifact",
                     run: str = "host") -> dict[str, float]:
    """Perplexity of both, its change, top-1 agreement and mean KL over the evaluation windows.

    Args:
        reference: callable ids[1, n] -> logits [1, n, vocab] (PyTorch float32).
        artifact: object with ``logits(ids)`` (the exported graph under its runtime).
        windows: token windows of the evaluation text.
        file, run: the artifact file and the run ("host", "crosscheck", "emulated", "device") that a
            ``NonFiniteOutput`` names when either side's logits hold NaN or Inf.
    """
    total: dict[str, float] = {}
    for i, w in enumerate(windows):
        ids = np.asarray([w], dtype=np.int64)
        ref, art = reference(ids)[0], artifact.logits(ids)[0]
        check_finite(ref, "the PyTorch float32 reference's logits", f"{run} run of {file}", window=i)
        check_finite(art, "the artifact's logits", f"{run} run of {file}", window=i)
        part = compare_logits(ref[:-1], art[:-1], ids[0, 1:])
        for k, v in part.items():
            total[k] = max(total.get(k, 0.0), v) if k == "max_abs" else total.get(k, 0.0) + v
    n = total["n"]
    ppl_ref, ppl_art = float(np.exp(total["nll_ref"] / n)), float(np.exp(total["nll_art"] / n))
    return {"perplexity_reference": ppl_ref, "perplexity": ppl_art,
            "perplexity_change_pct": 100.0 * (ppl_art / ppl_ref - 1.0),
            "top1_agreement": total["agree"] / n, "mean_kl": total["kl"] / n,
            "max_abs_logit_diff": total["max_abs"], "tokens_scored": n}


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
