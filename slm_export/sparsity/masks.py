"""Sparsity masks and their checks. Weights are ``[out, in]``; n:m groups run along ``in``, the GEMM's
reduction dimension, which is the layout sparse tensor cores need (TensorRT ``--sparsity=enable``)."""

from __future__ import annotations

import numpy as np
import torch

from slm_export.errors import ConfigError


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """"2:4" -> (2, 4); "unstructured" -> None."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise ConfigError(f"sparsity pattern must be N:M (e.g. 2:4) or 'unstructured', not {pattern!r}") from None
    if not 0 < n < m:
        raise ConfigError(f"sparsity pattern {pattern}: need 0 < N < M")
    return n, m


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest-scoring weights of every ``m`` consecutive along the input dimension."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise ConfigError(f"input dimension {in_f} is not a multiple of {m}: {n}:{m} sparsity cannot apply")
    groups = scores.reshape(out_f, in_f // m, m)
    keep = torch.topk(groups, n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out_f, in_f)


def unstructured_mask(scores: torch.Tensor, ratio: float, per_row: bool) -> torch.Tensor:
    """Zero the ``ratio`` lowest scores, per output row (Wanda) or over the whole matrix (magnitude)."""
    if per_row:
        k = int(scores.shape[1] * ratio)
        if k == 0:
            return torch.ones_like(scores, dtype=torch.bool)
        thresh = torch.kthvalue(scores, k, dim=1, keepdim=True).values
        return scores > thresh
    k = int(scores.numel() * ratio)
    if k == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    thresh = torch.kthvalue(scores.reshape(-1), k).values
    return scores > thresh


def satisfies_nm(nonzero: np.ndarray, n: int, m: int) -> bool:
    """True when every ``m`` consecutive entries along the last axis hold at most ``n`` non-zeros."""
    rows, cols = nonzero.shape
    if cols % m:
        return False
    return bool((nonzero.reshape(rows, cols // m, m).sum(-1) <= n).all())


def sparsity_of(nonzero: np.ndarray) -> float:
    return 1.0 - float(nonzero.mean())
