"""One compress run's state, handed explicitly to the units that fill it (``compress``, the per-layer
quantizers of ``layers.py``, the LM head of ``head.py``), and the figures each quantized weight adds to
the report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from slm_export.calibration.config import CompressConfig
from slm_export.calibration.data import CalibrationSet
from slm_export.calibration.quant import CHUNK_ELEMS, HotRowsTensor, QuantizedTensor, sqnr_db
from slm_export.calibration.rotation import Rotation
from slm_export.calibration.sequential import InputStats
from slm_export.hessian import output_energy
from slm_export.models.traits import ArchTraits
from slm_export.sparsity import sparsity_of

# AWQ: how a linear's float weight was rescaled before quantization, ``(cols, rows)`` (``CompressResult``)
ChannelScales = dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]


@dataclass
class CompressRun:
    """What the compress stage has made so far. ``work`` is a second module over the model's tensors
    (replacing its parameters is safe); ``originals`` its parameters as built, put back layer by layer."""

    model: Any
    cfg: CompressConfig
    traits: ArchTraits
    work: nn.Module
    originals: dict[str, nn.Parameter]
    progress: Callable[[str], None] | None = None
    quantized: dict[str, Any] = field(default_factory=dict)  # weight name -> QuantizedTensor (pruned float)
    changed: dict[str, torch.Tensor] = field(default_factory=dict)  # float params changed (AWQ's folded norms)
    report: list[dict[str, Any]] = field(default_factory=list)  # one entry per quantized weight
    channel_scales: ChannelScales = field(default_factory=dict)
    rotations: dict[int, Rotation] = field(default_factory=dict)  # down_proj's online rotation, by layer
    head_rotation: int | None = None  # the order of the attention heads' offline rotation
    calib: CalibrationSet | None = None
    head_stats: InputStats | None = None  # the LM head's input statistics, when calibration ran
    row_mass: list[np.ndarray] = field(default_factory=list)  # --lm-head-hot: the float head's row probability
    notes: list[str] = field(default_factory=list)
    transposed: set[str] = field(default_factory=set)  # Conv1D weights the work module holds as nn.Linear [out, in]

    def layer_prefix(self, layer: int) -> str:
        """The full name of decoder layer ``layer``."""
        return f"{self.traits.layers}.{layer}"

    def name(self, layer: int, sub: str) -> str:
        """The full name of ``sub`` (a path inside decoder layer ``layer``)."""
        return f"{self.layer_prefix(layer)}.{sub}"


def layer_entry(name: str, w: torch.Tensor, q: QuantizedTensor | torch.Tensor, cfg: CompressConfig,
                stats: InputStats | None) -> dict[str, Any]:
    """The report's figures for one weight: bits, group, weight SQNR and, over the calibration inputs, output SQNR."""
    ref = w.float().numpy()
    bits = q.bits if isinstance(q, QuantizedTensor) else 32
    needs_deq = cfg.sparsity is not None or stats is not None
    if not needs_deq and type(q) is QuantizedTensor and q.size > CHUNK_ELEMS:
        deq, weight_sqnr = None, sqnr_by_rows(ref, q)  # a large head or MLP: no full-size float copies
    else:
        deq = q.dequantize() if isinstance(q, QuantizedTensor) else q.numpy()
        weight_sqnr = sqnr32(ref, deq)
    entry = {"layer": name, "method": cfg.method if cfg.quantized else "float", "bits": bits,
             "group": q.group if isinstance(q, QuantizedTensor) else 0, "weight_sqnr_db": round(weight_sqnr, 2)}
    if cfg.w8a8:
        entry["group"] = "tensor" if cfg.pow2_scales else "channel"
    if isinstance(q, HotRowsTensor):
        entry["hot_rows"], entry["hot_bits"] = len(q.rows), q.hot.bits  # type: ignore[arg-type, union-attr]
    if cfg.sparsity is not None:
        entry["sparsity"] = round(sparsity_of(deq != 0), 4)
    if stats is not None and stats.hessian is not None:
        # Output SQNR over the calibration inputs from the Hessian: ||XW^T||^2 = tr(W H W^T).
        r = torch.from_numpy(ref)
        d = r - torch.from_numpy(deq)
        signal, noise = output_energy(r, stats.hessian), output_energy(d, stats.hessian)
        entry["output_sqnr_db"] = round(float(10 * np.log10(signal / max(noise, 1e-30))), 2)
    elif stats is not None and stats.sample:
        x = torch.cat(stats.sample)
        ref_out, q_out = x @ torch.from_numpy(ref).T, x @ torch.from_numpy(deq).T
        entry["output_sqnr_db"] = round(sqnr_db(ref_out.numpy(), q_out.numpy()), 2)
    return entry


def sqnr_by_rows(ref: np.ndarray, q: QuantizedTensor) -> float:
    """``sqnr32(ref, q.dequantize())`` summed over blocks of rows, so no full-size float copy is made."""
    rows = max(1, CHUNK_ELEMS // ref.shape[1])
    signal = noise = 0.0
    for i in range(0, ref.shape[0], rows):
        r = torch.from_numpy(ref[i:i + rows])
        signal += float((r * r).sum())
        noise += float(((r - torch.from_numpy(q[i:i + rows].dequantize())) ** 2).sum())
    return float(10 * np.log10(signal / max(noise, 1e-30)))


def sqnr32(ref: np.ndarray, approx: np.ndarray) -> float:
    """Signal to quantization noise in dB, computed in float32."""
    r = torch.from_numpy(ref)
    return float(10 * torch.log10((r * r).sum() / ((r - torch.from_numpy(approx)) ** 2).sum().clamp_min(1e-30)))


def bits_per_weight(weights: dict[str, Any]) -> float:
    """Mean stored bits per weight over the linear layers and the LM head (scales and zeros included)."""
    bits, count = 0.0, 0
    for name, w in weights.items():
        if isinstance(w, QuantizedTensor):
            bits += w.storage_bytes() * 8
            count += w.size
        elif name.endswith("proj.weight"):
            bits += w.numel() * 32
            count += w.numel()
    return bits / max(count, 1)
