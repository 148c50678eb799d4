"""Accuracy metrics of an artifact against the PyTorch float32 reference."""

from __future__ import annotations

from typing import Any

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare_logits(ref: np.ndarray, art: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Sums over one window of [seq, vocab] logits: NLL of each, top-1 agreement, KL(ref || art)."""
    lr, la = log_softmax(ref), log_softmax(art)
    idx = np.arange(len(targets))
    kl = (np.exp(lr) * (lr - la)).sum(-1)
    return {"nll_ref": float(-lr[idx, targets].sum()), "nll_art": float(-la[idx, targets].sum()),
            "agree": float((ref.argmax(-1) == art.argmax(-1)).sum()), "kl": float(kl.sum()),
            "n": float(len(targets)), "max_abs": float(np.abs(ref - art).max())}


def decoder_accuracy(reference: Any, artifact: Any, windows: list[list[int]]) -> dict[str, float]:
    """Perplexity of both, its change, top-1 agreement and mean KL over the evaluation windows.

    Args:
        reference: callable ids[1, n] -> logits [1, n, vocab] (PyTorch float32).
        artifact: object with ``logits(ids)`` (the exported graph under its runtime).
        windows: token windows of the evaluation text.
    """
    total: dict[str, float] = {}
    for w in windows:
        ids = np.asarray([w], dtype=np.int64)
        part = compare_logits(reference(ids)[0, :-1], artifact.logits(ids)[0, :-1], ids[0, 1:])
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
