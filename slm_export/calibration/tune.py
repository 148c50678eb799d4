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
from slm_export.errors import ConfigError

# Positions x vocabulary entries of float32 logits per forward micro-batch (about 0.5 GB per copy).
LOGITS_BUDGET = 1 << 27


@dataclass(frozen=True)
class TuneConfig:
    """``epochs``: passes over the calibration samples (0: no tuning). Adam with a cosine decay; the
    norms move by ``norm_lr`` per step at most, the scales by ``scale_lr`` of their own size."""

    epochs: int = 0
    batch: int = 4  # samples per optimizer step
    norm_lr: float = 1e-3
    scale_lr: float = 2e-3  # relative: each scale is tuned as s0 * (1 + r)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.epochs > 100:
            raise ConfigError(f"--tune-epochs must be between 0 and 100, not {self.epochs}")


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
    embedding, which keeps the float table (the graph's Gather)."""
    from slm_export.models.loader import build_module

    dense = {k: torch.from_numpy(v.dequantize()) if isinstance(v, QuantizedTensor)
             else v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in weights.items()}
    twin = build_module(replace(model, weights=dense, _module=[]))
    if isinstance(weights.get("lm_head.weight"), QuantizedTensor):
        twin.lm_head.weight = nn.Parameter(dense["lm_head.weight"])
        embed = twin.get_input_embeddings()
        embed.weight = nn.Parameter(embed.weight.detach().clone())
    return twin


def tune_end_to_end(model: Any, weights: dict[str, Any], calib_ids: np.ndarray, cfg: TuneConfig,
                    progress: Callable[[str], None] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tune ``weights`` (the compress stage's weight-only quantized linears and folded norms; W8A8 is refused
    by ``CompressConfig``) against ``model``'s float outputs on ``calib_ids`` [samples, seqlen]. Returns the
    new weights and a summary for the report."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    reference = model.torch_module().eval()
    twin = dequantized_twin(model, weights).eval()  # copies: the norms it tunes may be the float model's own
    for p in twin.parameters():
        p.requires_grad_(False)
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
    norms = {n: p for n, p in twin.named_parameters() if "norm" in n.rsplit(".", 2)[-2] and p.dim() == 1}
    for p in norms.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": list(norms.values()), "lr": cfg.norm_lr},
                            {"params": [s.r for s in scaled], "lr": cfg.scale_lr}])
    ids = torch.from_numpy(calib_ids.astype(np.int64))
    per_step = min(cfg.batch, len(ids))
    steps = cfg.epochs * (len(ids) // per_step)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / max(steps, 1))))
    vocab = int(reference.get_output_embeddings().weight.shape[0])
    micro = max(1, min(per_step, LOGITS_BUDGET // (ids.shape[1] * vocab)))

    def set_weights() -> None:
        for s in scaled:
            s.module.weight = s.weight()

    def kl(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ref = torch.log_softmax(reference(x).logits.float(), -1)
        out = torch.log_softmax(twin(x).logits.float(), -1)
        return (ref.exp() * (ref - out)).sum(-1).mean()

    losses: list[float] = []
    step = 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        for b in range(0, len(ids) - per_step + 1, per_step):
            batch = ids[order[b:b + per_step]]
            opt.zero_grad()
            set_weights()
            total = 0.0
            for part in batch.split(micro):
                loss = kl(part) * (len(part) / len(batch))
                loss.backward()
                total += float(loss.detach())
            opt.step()
            sched.step()
            with torch.no_grad():  # a scale keeps its sign: the codes were rounded on that side
                for s in scaled:
                    s.r.clamp_(min=-0.5)
            step += 1
            losses.append(total)
            if progress:
                progress(f"tune step {step}/{steps}: KL {total:.4f}")
    out = dict(weights)
    for s in scaled:
        out[s.name] = replace(s.q, scales=s.scales())  # a HotRowsTensor keeps its int8 rows
    for n, p in norms.items():
        out[n] = p.detach().clone()
    quarter = max(1, len(losses) // 4)
    summary = {"epochs": cfg.epochs, "steps": step, "samples": int(len(ids)), "norm_tensors": len(norms),
               "scales": int(sum(s.r.numel() for s in scaled)),
               "calibration_kl_first_quarter": float(np.mean(losses[:quarter])) if losses else None,
               "calibration_kl_last_quarter": float(np.mean(losses[-quarter:])) if losses else None,
               "seconds": round(time.perf_counter() - t0, 1)}
    return out, summary
