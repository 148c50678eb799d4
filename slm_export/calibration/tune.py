"""End-to-end tuning after quantization: the float parameters the runtime reads anyway (each norm's
weights, and each quantized group's scale) are fitted so that the quantized model's next-token
distribution matches the float model's (KL divergence) over the calibration samples.

The integer codes, zero points and scale signs stay fixed, so the artifact keeps its format, its size and
its speed. GPTQ and AWQ fit each layer to its own float outputs, one layer at a time; this step sees the
errors that layers pass on to each other and what they do to the logits (EfficientQAT's end-to-end
training of the quantization parameters, Chen et al., 2024; norm tweaking, Li et al., 2024).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from slm_export.calibration.quant import HotRowsTensor, QuantizedTensor
from slm_export.models.traits import traits_for

# Positions x vocabulary entries of float32 logits per forward micro-batch (about 0.5 GB per copy).
LOGITS_BUDGET = 1 << 27


# Adam with a cosine decay over the steps: the norms move by NORM_LR per step at most, the scales by SCALE_LR
# of their own size. The passes and the seed are the plan's (``tune_epochs``, ``seed``).
BATCH = 4  # samples per optimizer step
NORM_LR = 1e-3
SCALE_LR = 2e-3  # relative: each scale is tuned as s0 * (1 + r)


@dataclass
class _Scaled:
    """One quantized linear in the tuned twin: ``weight = codes_centred * (s0 * (1 + r))`` per group."""

    module: nn.Linear
    name: str
    q: QuantizedTensor
    centred: torch.Tensor  # [out, in // g, g] float codes minus zero point
    s0: torch.Tensor  # [out, in // g]
    r: nn.Parameter  # relative change of each scale
    hot: torch.Tensor | None = None  # HotRowsTensor: the int8 rows' dequantized weights, fixed
    rows: torch.Tensor | None = None

    def weight(self) -> torch.Tensor:
        o, i = self.q.shape
        w = (self.centred * (self.s0 * (1 + self.r))[:, :, None]).reshape(o, i)
        if self.hot is not None:
            w = w.index_put((self.rows,), self.hot)
        return w

    def scales(self) -> np.ndarray:
        with torch.no_grad():
            return (self.s0 * (1 + self.r)).numpy().astype(self.q.scales.dtype)


def _centred(q: QuantizedTensor) -> torch.Tensor:
    o, i = q.shape
    zero = q.zero_points.astype(np.float32)[:, :, None]
    return torch.from_numpy(q.codes.astype(np.float32).reshape(o, i // q.group, q.group) - zero)


def dequantized_twin(model: Any, weights: dict[str, Any]) -> nn.Module:
    """The PyTorch model with ``weights`` (the compress stage's) dequantized, on its own copies of every
    tensor: what an exported graph computes. A quantized LM head of a tied model is untied from the
    embedding, which keeps the float table (the graph's Gather). Quantized Conv1D weights (GPT-2's layers) are
    [out, in] (``ArchTraits.conv1d``): transposed back into the module's layout."""
    from slm_export.models.loader import build_module

    traits = traits_for(model.model_type, model.config)
    head = traits.lm_head
    dense = {k: torch.from_numpy(v.dequantize()) if isinstance(v, QuantizedTensor)
             else v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in weights.items()}
    if traits.conv1d:
        dense.update({k: dense[k].T.contiguous() for k, v in weights.items()
                      if isinstance(v, QuantizedTensor) and k.startswith(traits.layers + ".")})
    twin = build_module(replace(model, weights=dense, _module=[]))
    if isinstance(weights.get(head), QuantizedTensor):
        twin.get_submodule(head.rsplit(".", 1)[0]).weight = nn.Parameter(dense[head])
        embed = twin.get_input_embeddings()
        embed.weight = nn.Parameter(embed.weight.detach().clone())
    return twin


@dataclass
class _Fit:
    """The tuning's working set: the float reference, the dequantized twin whose scales and norms move, and
    the optimizer over them."""

    reference: nn.Module
    twin: nn.Module
    scaled: list[_Scaled]
    norms: dict[str, nn.Parameter]
    opt: torch.optim.Optimizer
    micro: int  # samples per forward pass (``LOGITS_BUDGET``)

    def set_weights(self) -> None:
        for s in self.scaled:
            s.module.weight = s.weight()

    def kl(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ref = torch.log_softmax(self.reference(x).logits.float(), -1)
        out = torch.log_softmax(self.twin(x).logits.float(), -1)
        return (ref.exp() * (ref - out)).sum(-1).mean()

    def step(self, batch: torch.Tensor) -> float:
        """One optimizer step on ``batch``; returns its KL divergence."""
        self.opt.zero_grad()
        self.set_weights()
        total = 0.0
        for part in batch.split(self.micro):
            loss = self.kl(part) * (len(part) / len(batch))
            loss.backward()
            total += float(loss.detach())
        self.opt.step()
        return total


def _scaled_linears(twin: nn.Module, weights: dict[str, Any]) -> list[_Scaled]:
    """Each quantized linear of ``twin`` with its weight replaced by the tunable ``_Scaled`` form."""
    modules = dict(twin.named_modules())
    scaled: list[_Scaled] = []
    for name, q in weights.items():
        if not isinstance(q, QuantizedTensor):
            continue
        module = modules[name.rsplit(".", 1)[0]]
        s = _Scaled(module, name, q, _centred(q), torch.from_numpy(q.scales.astype(np.float32)),
                    nn.Parameter(torch.zeros(q.scales.shape)))
        if isinstance(q, HotRowsTensor):
            s.hot, s.rows = torch.from_numpy(q.hot.dequantize()), torch.from_numpy(q.rows.astype(np.int64))
        del module._parameters["weight"]
        scaled.append(s)
    return scaled


def _prepare(model: Any, weights: dict[str, Any], n_ids: int, seqlen: int, steps: int) -> tuple[_Fit, Any]:
    """The working set and the learning-rate schedule over ``steps``."""
    reference = model.torch_module().eval()
    twin = dequantized_twin(model, weights).eval()  # copies: the norms it tunes may be the float model's own
    for p in twin.parameters():
        p.requires_grad_(False)
    scaled = _scaled_linears(twin, weights)
    norms = {n: p for n, p in twin.named_parameters() if "norm" in n.rsplit(".", 2)[-2] and p.dim() == 1}
    for p in norms.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": list(norms.values()), "lr": NORM_LR},
                            {"params": [s.r for s in scaled], "lr": SCALE_LR}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / max(steps, 1))))
    vocab = int(reference.get_output_embeddings().weight.shape[0])
    micro = max(1, min(min(BATCH, n_ids), LOGITS_BUDGET // (seqlen * vocab)))
    return _Fit(reference, twin, scaled, norms, opt, micro), sched


def tune_end_to_end(model: Any, weights: dict[str, Any], calib_ids: np.ndarray, epochs: int, seed: int,
                    progress: Callable[[str], None] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tune ``weights`` (the compress stage's weight-only quantized linears and folded norms; W8A8 is refused
    by ``CompressConfig``) against ``model``'s float outputs on ``calib_ids`` [samples, seqlen], ``epochs``
    passes over them in an order drawn from ``seed``. Returns the new weights and a summary for the report."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    ids = torch.from_numpy(calib_ids.astype(np.int64))
    per_step = min(BATCH, len(ids))
    steps = epochs * (len(ids) // per_step)
    fit, sched = _prepare(model, weights, len(ids), ids.shape[1], steps)
    losses: list[float] = []
    for epoch in range(epochs):
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed + epoch))
        for b in range(0, len(ids) - per_step + 1, per_step):
            losses.append(fit.step(ids[order[b:b + per_step]]))
            sched.step()
            with torch.no_grad():  # a scale keeps its sign: the codes were rounded on that side
                for s in fit.scaled:
                    s.r.clamp_(min=-0.5)
            if progress:
                progress(f"tune step {len(losses)}/{steps}: KL {losses[-1]:.4f}")
    out = dict(weights)
    for s in fit.scaled:
        out[s.name] = replace(s.q, scales=s.scales())  # a HotRowsTensor keeps its int8 rows
    for n, p in fit.norms.items():
        out[n] = p.detach().clone()
    return out, _summary(epochs, len(ids), fit, losses, t0)


def _summary(epochs: int, samples: int, fit: _Fit, losses: list[float], t0: float) -> dict[str, Any]:
    quarter = max(1, len(losses) // 4)
    return {"epochs": epochs, "steps": len(losses), "samples": samples, "norm_tensors": len(fit.norms),
            "scales": int(sum(s.r.numel() for s in fit.scaled)),
            "calibration_kl_first_quarter": float(np.mean(losses[:quarter])) if losses else None,
            "calibration_kl_last_quarter": float(np.mean(losses[-quarter:])) if losses else None,
            "seconds": round(time.perf_counter() - t0, 1)}
