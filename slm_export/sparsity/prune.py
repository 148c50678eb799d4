"""Pruning methods, one function each behind ``SparsityConfig``:

- magnitude: score |W|;
- wanda: score |W| x ||x_j||_2, the input channel's activation norm over calibration (Sun et al., 2023);
- sparsegpt: choose and remove weights column block by column block with the inverse Hessian of the
  layer's inputs, updating the remaining weights to compensate (Frantar & Alistarh, 2023), sharing the
  Hessian machinery of GPTQ (``slm_export/hessian.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slm_export.errors import ConfigError
from slm_export.hessian import PreparedHessian, prepare
from slm_export.sparsity.masks import nm_mask, parse_pattern, unstructured_mask

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class SparsityConfig:
    # Kept as a config: the sparsity package sits below calibration (it does not read CompressConfig), and the
    # pruning spec carries SparseGPT's own constants (block; damp for a Hessian given unprepared).
    pattern: str = "2:4"
    method: str = "sparsegpt"
    ratio: float = 0.5  # for unstructured
    damp: float = 0.01
    block: int = 128

    def __post_init__(self) -> None:
        parse_pattern(self.pattern)
        if self.method not in PRUNE_METHODS:
            raise ConfigError(f"unknown sparsity method {self.method!r}; methods: {', '.join(PRUNE_METHODS)}")
        if not 0 < self.ratio < 1:
            raise ConfigError(f"sparsity ratio must be in (0, 1), not {self.ratio}")

    @property
    def needs_data(self) -> bool:
        return self.method != "magnitude"


def _mask(scores: torch.Tensor, cfg: SparsityConfig, per_row: bool) -> torch.Tensor:
    nm = parse_pattern(cfg.pattern)
    return nm_mask(scores, *nm) if nm else unstructured_mask(scores, cfg.ratio, per_row)


def prune(weight: torch.Tensor, cfg: SparsityConfig, sq_sum: torch.Tensor | None = None,
          hessian: torch.Tensor | PreparedHessian | None = None) -> torch.Tensor:
    """The pruned weight (zeros where removed); ``weight`` itself is not modified."""
    w = weight.detach().float()
    if cfg.method == "magnitude":
        return w * _mask(w.abs(), cfg, per_row=False)
    if cfg.method == "wanda":
        if sq_sum is None:
            raise ValueError("wanda needs activation norms")
        return w * _mask(w.abs() * sq_sum.sqrt().unsqueeze(0), cfg, per_row=True)
    if hessian is None:
        raise ValueError("sparsegpt needs the layer's Hessian")
    return _sparsegpt(w, hessian, cfg)


def _sparsegpt(w: torch.Tensor, hessian: torch.Tensor | PreparedHessian, cfg: SparsityConfig) -> torch.Tensor:
    prep = hessian if isinstance(hessian, PreparedHessian) else prepare(hessian, cfg.damp, act_order=False)
    if not torch.equal(prep.perm, torch.arange(len(prep.perm))):
        raise ValueError("sparsegpt needs the Hessian in the original column order")
    W = w.clone().numpy()
    W[:, prep.dead.numpy()] = 0
    Hinv = prep.hinv.numpy()
    out_f, in_f = W.shape
    nm = parse_pattern(cfg.pattern)
    block = cfg.block if nm is None else max(nm[1], cfg.block // nm[1] * nm[1])
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1 = W[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = np.diag(Hinv1)
        if nm is None:  # choose this block's share of the unstructured budget, per row
            score = W1 ** 2 / d[None, :] ** 2
            keep = torch.from_numpy(unstructured_mask(torch.from_numpy(score), cfg.ratio, per_row=True).numpy())
            keep = keep.numpy()
        else:
            keep = np.ones_like(W1, dtype=bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:  # n:m: decide the next group of m columns on updated weights
                score = W1[:, i:i + nm[1]] ** 2 / d[None, i:i + nm[1]] ** 2
                drop = np.argsort(score, axis=1)[:, : nm[1] - nm[0]]
                keep[:, i:i + nm[1]] = True
                np.put_along_axis(keep[:, i:i + nm[1]], drop, False, axis=1)
            w_col = W1[:, i]
            q = np.where(keep[:, i], w_col, 0.0)
            err = (w_col - q) / Hinv1[i, i]
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return torch.from_numpy(W)
