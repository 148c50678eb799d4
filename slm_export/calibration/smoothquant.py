"""W8A8 with SmoothQuant (Xiao et al., 2023): int8 weights and int8 activations.

Activation outliers sit in a few input channels. SmoothQuant divides those channels of the input by
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` and multiplies the matching weight columns by ``s_j``:
the product is unchanged, the activation range shrinks, and 1/s is folded into whatever produced the
input (the RMSNorm weight before q/k/v and gate/up; the rows of up_proj before down_proj), so the
graph gets no extra op. ``alpha`` is settable; left unset it is searched per input group over a grid,
keeping the value whose simulated int8 output is closest to the float output on calibration rows.

Weights are then int8 per output channel (or per tensor with power-of-two scales for DPU-class
accelerators); activations get a static per-tensor scale from an observer (see ``observers``) run over
the calibration set after smoothing. The exporter writes both as QuantizeLinear/DequantizeLinear pairs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slm_export.calibration.observers import fake_quant
from slm_export.calibration.quant import (
    QuantizedTensor,
    group_params,
    quantize_codes,
    quantize_per_tensor,
    quantize_rtn,
)
from slm_export.hessian import output_energy

Rotate = Callable[[torch.Tensor], torch.Tensor]
ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(0, 21))


def live_floor(stat: torch.Tensor, eps: float) -> torch.Tensor:
    """A per-channel activation statistic floored at 1% of its median (and ``eps``): a channel calibration never
    saw active (a ReLU unit dead on the calibration text) would otherwise get a scale near zero, and its producer
    ``1 / s``: thousands of times any activation it does show later, which the rounding of the reader's scaled
    weights (spread over every channel by a rotation) then multiplies."""
    return stat.clamp_min(max(eps, 1e-2 * float(stat.median())))


def smooth_scales(act_amax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Per input channel ``s``: the linears read ``x / s`` and hold ``W * s``."""
    w_amax = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
    s = live_floor(act_amax, 1e-5) ** alpha / w_amax.clamp_min(1e-5) ** (1 - alpha)
    return s.clamp(1e-4, 1e4)


def quantize_weight(w: torch.Tensor, pow2: bool) -> QuantizedTensor:
    """int8 symmetric: per output channel, or per tensor with a power-of-two scale."""
    return quantize_per_tensor(w, 8, pow2=True) if pow2 else quantize_rtn(w, 8, w.shape[1], True)


def pow2_weight_scale(w: torch.Tensor, hessian: torch.Tensor | None = None, bits: int = 8) -> float:
    """The per-tensor power-of-two step for ``w``: the one that clips nothing and the two below it,
    keeping the least output error ``tr(dW H dW^T)`` over the calibration inputs (plain squared error
    without a Hessian). A smaller step clips the few largest weights but rounds all the others finer."""
    qmax = (1 << (bits - 1)) - 1
    k = int(torch.ceil(torch.log2((w.abs().max() / qmax).clamp_min(1e-30))))
    best, best_err = 2.0 ** k, float("inf")
    for step in (2.0 ** k, 2.0 ** (k - 1), 2.0 ** (k - 2)):
        d = w - torch.clamp(torch.round(w / step), -qmax - 1, qmax) * step
        err = output_energy(d, hessian) if hessian is not None else float((d * d).sum())
        if err < best_err:
            best, best_err = step, err
    return best


def _act_scale(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    s = (amax / 127).clamp_min(1e-8)
    return torch.exp2(torch.ceil(torch.log2(s))) if pow2 else s


def fake_quant_weight(w: torch.Tensor, pow2: bool) -> torch.Tensor:
    """``quantize_weight(w, pow2).dequantize()`` in torch, without the codes: the same float32 values."""
    rows = w.reshape(1, -1) if pow2 else w
    scale, zero = group_params(rows, 8, True, pow2=pow2)
    return quantize_codes(rows, scale, zero, 8).sub_(zero).mul_(scale).reshape(w.shape)


def simulated_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor, pow2: bool,
                    act_amax: torch.Tensor | None = None, rotate: Rotate | None = None,
                    refs: list[torch.Tensor] | None = None) -> float:
    """Squared error of int8(x / s) @ int8(W * s)^T against x @ W^T, summed over the linears.

    The activation scale is the min-max one the whole calibration set gives after smoothing,
    ``max_j(act_amax_j / s_j)`` (the sample's own maximum when ``act_amax`` is not given).
    ``rotate``: an orthogonal map applied to the smoothed input and weight rows (the sample's maximum
    then sets the scale: the rotated range is not known from per-channel maxima).
    ``refs``: the float outputs ``x @ W^T`` when the caller has them (a search over ``s`` computes them once)."""
    xs = x / s
    if rotate is not None:
        xs, act_amax = rotate(xs), None
    top = (act_amax / s).amax() if act_amax is not None else xs.abs().amax()
    xq = fake_quant(xs, _act_scale(top, pow2))
    err = 0.0
    for i, w in enumerate(weights):
        ref = refs[i] if refs is not None else x @ w.T
        ws = rotate(w * s) if rotate is not None else w * s
        err += float((xq @ fake_quant_weight(ws, pow2).T).sub_(ref).square_().sum())
    return err


def choose_scales(x_sample: torch.Tensor, act_amax: torch.Tensor, weights: list[torch.Tensor], alpha: float | None,
                  pow2: bool, rotate: Rotate | None = None) -> tuple[torch.Tensor, float | None]:
    """The smoothing scales for one input group, and the alpha used: ``alpha`` when given (the plan's
    ``smooth_alpha``), else the one searched on ``ALPHA_GRID`` (None: no smoothing was best). ``pow2``:
    per-tensor power-of-two scales (the plan's ``pow2_scales``)."""
    if alpha is not None:
        return smooth_scales(act_amax, weights, alpha), alpha
    refs = [x_sample @ w.T for w in weights]
    best = (simulated_error(x_sample, weights, torch.ones_like(act_amax), pow2, act_amax, rotate, refs), None)
    best_s = torch.ones_like(act_amax)
    for a in ALPHA_GRID:
        s = smooth_scales(act_amax, weights, a)
        err = simulated_error(x_sample, weights, s, pow2, act_amax, rotate, refs)
        if err < best[0]:
            best, best_s = (err, a), s
    return best_s, best[1]
