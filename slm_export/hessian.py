"""The calibration Hessian of a linear layer's inputs, ``H = sum of x^T x`` over the calibration tokens: its
accumulation, the output energy it measures, and its preparation for the column-by-column solvers (dead
channels, damping, the Cholesky factor of the inverse). GPTQ (``calibration/gptq.py``) and SparseGPT
(``sparsity/prune.py``) both read it, so it sits below both stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slm_export.errors import ConfigError


def accumulate(hessian: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``hessian + x^T x`` for float32 rows ``x`` [tokens, in]; in place when ``hessian`` is given."""
    if hessian is None:
        hessian = torch.zeros(x.shape[1], x.shape[1])
    return hessian.addmm_(x.T, x)


def output_energy(w: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(W H W^T)``: the summed squares of ``x W^T`` over the calibration inputs (of an error ``W`` too)."""
    return float(((w @ hessian) * w).sum())


@dataclass(frozen=True)
class PreparedHessian:
    """What a column-by-column solver needs from a layer input's Hessian, computed once for every linear
    reading that input."""

    perm: torch.Tensor  # column order (descending Hessian diagonal with act_order)
    hinv: torch.Tensor  # upper Cholesky factor of the damped inverse Hessian, in ``perm`` order
    dead: torch.Tensor  # input channels never active in calibration
    diag: torch.Tensor  # the Hessian's diagonal in the original order: each input channel's energy


def prepare(hessian: torch.Tensor, damp: float, act_order: bool) -> PreparedHessian:
    """Dead channels get a unit diagonal, ``damp`` times the mean diagonal is added, and the inverse is
    factored; ``act_order``: columns in order of falling diagonal."""
    # At most two [in, in] copies alive at once (a 14k-wide MLP input's are 0.8 GB each): permuted in one
    # indexing, damped on the diagonal in place, each factor dropped once the next exists.
    in_f = hessian.shape[0]
    diag = torch.diag(hessian).float().clone()
    dead = diag == 0
    live = torch.where(dead, torch.ones_like(diag), diag)  # a dead channel's diagonal counts as 1
    perm = torch.argsort(live, descending=True) if act_order else torch.arange(in_f)
    H = hessian.float()[perm[:, None], perm[None, :]]
    H.diagonal()[dead[perm]] = 1
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    try:
        L = torch.linalg.cholesky(H)
        del H
        inv = torch.cholesky_inverse(L)
        del L
        hinv = torch.linalg.cholesky(inv, upper=True)
    except torch.linalg.LinAlgError:
        raise ConfigError("GPTQ: the calibration Hessian is not positive definite even after damping; "
                          "raise the damping or give more calibration samples") from None
    return PreparedHessian(perm, hinv, dead, diag)
