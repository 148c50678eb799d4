"""GPTQ: quantize a weight column by column, spreading each column's rounding error over the columns
not yet quantized through the inverse Hessian of the layer's calibration inputs (Frantar et al., 2022).

Groups are contiguous along the input dimension in the original order (what MatMulNBits and blocked
DequantizeLinear store); with activation ordering, each group's scale is fixed from the original
weights first ("static groups"), so the order of quantization does not change the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slm_export.calibration.quant import QuantizedTensor, check_group, group_params, search_group_clip
from slm_export.errors import ConfigError
from slm_export.hessian import PreparedHessian, prepare

# Weights rounded at a time, as blocks of rows: each block's working copies (the weight, its float codes, the
# range search's temporaries) stay small beside a layer's Hessians, and the codes are the same (rows are independent).
ROW_BLOCK_ELEMS = 1 << 22


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ settings. ``damp`` is the fraction of the mean Hessian diagonal added for stability."""

    # Kept as a config: the grid differs per call (the plan's bits, the LM head's, W8A8's per-channel int8) and it
    # carries GPTQ's own constants (block, mse).

    bits: int = 4
    group: int = 32
    symmetric: bool = False
    damp: float = 0.01
    act_order: bool = True
    block: int = 128
    # Group ranges by the least output error over shrink factors (|w - q(w)|^2 weighted by the Hessian's
    # diagonal), not plain min-max.
    mse: bool = True
    signed: bool = False  # symmetric below 8 bits: signed scales (``group_params``)

    def __post_init__(self) -> None:
        if self.bits not in (3, 4, 8):
            raise ConfigError(f"GPTQ bits must be 3, 4 or 8, not {self.bits}")
        if not 0 < self.damp < 1:
            raise ConfigError(f"GPTQ damping must be in (0, 1), not {self.damp}")
        if self.block < 1:
            raise ConfigError("GPTQ block must be positive")


def prepare_hessian(hessian: torch.Tensor, cfg: GPTQConfig) -> PreparedHessian:
    """The Hessian prepared with ``cfg``'s damping and column order."""
    return prepare(hessian, cfg.damp, cfg.act_order)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor | PreparedHessian, cfg: GPTQConfig,
                  keep: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> QuantizedTensor:
    """Quantize ``weight`` [out, in] given the Hessian (sum of x^T x over its calibration inputs).

    ``keep`` (bool [out, in]) marks weights a sparsity step kept: the others stay exactly zero. ``scale`` ([out,
    in / group], symmetric only): a fixed grid (e.g. one power of two for the tensor), not each group's min-max."""
    prep = hessian if isinstance(hessian, PreparedHessian) else prepare_hessian(hessian, cfg)
    if weight.shape[0] > max(1, ROW_BLOCK_ELEMS // max(weight.shape[1], 1)):  # a large tensor: by blocks of rows
        return _by_rows(weight, prep, cfg, keep, scale)
    W = weight.detach().float().clone()
    out_f, in_f = W.shape
    group = in_f if cfg.group <= 0 else cfg.group
    check_group(in_f, group)
    W[:, prep.dead] = 0
    # Group scales from the original weights, contiguous in the original order.
    if scale is None:
        groups = W.reshape(-1, group)
        if cfg.mse and cfg.bits < 8:
            importance = prep.diag.reshape(1, in_f // group, group).expand(out_f, -1, -1).reshape(-1, group)
            scale, zero = search_group_clip(groups, cfg.bits, cfg.symmetric, norm=2.0, importance=importance,
                                            signed=cfg.signed)
        else:
            scale, zero = group_params(groups, cfg.bits, cfg.symmetric, signed=cfg.signed)
    else:
        if not cfg.symmetric:
            raise ValueError("a fixed GPTQ grid is symmetric")
        scale = scale.float().expand(out_f, in_f // group).reshape(-1, 1)
        zero = torch.full_like(scale, 1 << (cfg.bits - 1))
    scale = scale.reshape(out_f, in_f // group)
    zero = zero.reshape(out_f, in_f // group)
    perm, Hinv = prep.perm, prep.hinv
    W = W[:, perm]
    keep_n = None if keep is None else keep[:, perm].numpy()
    # The column loop runs in NumPy: per-op overhead there is a few microseconds, torch's is ~10x that.
    Wn, Hn = W.numpy(), Hinv.numpy()
    sc, zr = scale.numpy(), zero.numpy()
    gidx = (perm // group).numpy()  # the group of each column in the permuted order
    codes = np.zeros_like(Wn)
    qmax = (1 << cfg.bits) - 1
    for i1 in range(0, in_f, cfg.block):
        i2 = min(i1 + cfg.block, in_f)
        W1 = Wn[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        Hinv1 = Hn[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            s, z = sc[:, gidx[i1 + i]], zr[:, gidx[i1 + i]]
            c = np.clip(np.rint(w / s) + z, 0, qmax)
            if keep_n is not None:
                c = np.where(keep_n[:, i1 + i], c, z)  # a pruned weight dequantizes to exactly 0
            codes[:, i1 + i] = c
            err = (w - (c - z) * s) / Hinv1[i, i]
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        Wn[:, i2:] -= Err1 @ Hn[i1:i2, i2:]
    codes = torch.from_numpy(codes)
    inv = torch.argsort(perm)
    codes = codes[:, inv]
    return QuantizedTensor(codes.to(torch.uint8).numpy(), scale.numpy().astype("float32"),
                           None if cfg.symmetric else zero.to(torch.uint8).numpy(), cfg.bits, group)


def _by_rows(weight: torch.Tensor, prep: PreparedHessian, cfg: GPTQConfig, keep: torch.Tensor | None,
             scale: torch.Tensor | None) -> QuantizedTensor:
    """``gptq_quantize`` by blocks of rows. Rows are rounded independently given the Hessian (their group scales
    too), so the codes are the same, with working copies of one block instead of several of a whole LM head."""
    rows = max(1, ROW_BLOCK_ELEMS // weight.shape[1])

    def part(i: int) -> QuantizedTensor:
        sl = slice(i, i + rows)
        grid = scale if scale is None or scale.shape[0] == 1 else scale[sl]  # one grid for all, or per row
        return gptq_quantize(weight[sl], prep, cfg, None if keep is None else keep[sl], grid)

    return QuantizedTensor.concat([part(i) for i in range(0, weight.shape[0], rows)])
