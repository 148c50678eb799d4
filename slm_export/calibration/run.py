"""One compress run's state, handed explicitly to the units that fill it (``compress``, the per-layer
quantizers of ``layers.py``, the LM head of ``head.py``), and the figures each quantized weight adds to
the report."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from slm_export.calibration.config import CompressConfig
from slm_export.calibration.data import CalibrationSet
from slm_export.calibration.quant import CHUNK_ELEMS, HotRowsTensor, PackedQuantized, QuantizedTensor, sqnr_db
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
    # A streamed model's layer parameters as read for calibration (``work`` holds meta ones between layers), weakly:
    # a rounded linear's float weight is freed once its dequantized one replaces it, not held to the layer's end.
    loaded: dict[str, weakref.ref] = field(default_factory=dict)

    def keep(self, name: str, q: Any) -> None:
        """Hold ``q`` as weight ``name``'s result; a streamed model's int4 codes two to a byte (they are held until
        the graph is written, and a model too large to hold in float would not hold them a byte each either)."""
        self.quantized[name] = PackedQuantized.of(q) if self.model.streamed and isinstance(q, QuantizedTensor) else q

    def layer_prefix(self, layer: int) -> str:
        """The full name of decoder layer ``layer``."""
        return f"{self.traits.layers}.{layer}"

    def name(self, layer: int, sub: str) -> str:
        """The full name of ``sub`` (a path inside decoder layer ``layer``)."""
        return f"{self.layer_prefix(layer)}.{sub}"


def layer_entry(name: str, w: torch.Tensor, q: QuantizedTensor | torch.Tensor, cfg: CompressConfig,
                stats: InputStats | None) -> dict[str, Any]:
    """The report's figures for one weight: bits, group, weight SQNR and, over the calibration inputs, output SQNR."""
    bits = q.bits if isinstance(q, QuantizedTensor) else 32
    entry = {"layer": name, "method": cfg.method if cfg.quantized else "float", "bits": bits,
             "group": q.group if isinstance(q, QuantizedTensor) else 0}
    if cfg.w8a8:
        entry["group"] = "tensor" if cfg.pow2_scales else "channel"
    if isinstance(q, HotRowsTensor):
        entry["hot_rows"], entry["hot_bits"] = len(q.rows), q.hot.bits  # type: ignore[arg-type, union-attr]
    # A large head or MLP is measured by blocks of rows: no full-size float copies of it.
    figures = _figures_by_rows(w, q, stats) if w.numel() > CHUNK_ELEMS else _figures(w, q, stats)
    entry["weight_sqnr_db"] = round(figures["weight_sqnr_db"], 2)
    if cfg.sparsity is not None:
        entry["sparsity"] = round(figures["sparsity"], 4)
    if "output_sqnr_db" in figures:
        entry["output_sqnr_db"] = round(figures["output_sqnr_db"], 2)
    return entry


def _figures(w: torch.Tensor, q: QuantizedTensor | torch.Tensor, stats: InputStats | None) -> dict[str, float]:
    ref = w.float().numpy()
    deq = q.dequantize() if isinstance(q, QuantizedTensor) else q.numpy()
    out = {"weight_sqnr_db": sqnr32(ref, deq), "sparsity": sparsity_of(deq != 0)}
    if stats is not None and stats.hessian is not None:
        # Output SQNR over the calibration inputs from the Hessian: ||XW^T||^2 = tr(W H W^T).
        r = torch.from_numpy(ref)
        d = r - torch.from_numpy(deq)
        signal, noise = output_energy(r, stats.hessian), output_energy(d, stats.hessian)
        out["output_sqnr_db"] = float(10 * np.log10(signal / max(noise, 1e-30)))
    elif stats is not None and stats.sample:
        x = torch.cat(stats.sample)
        ref_out, q_out = x @ torch.from_numpy(ref).T, x @ torch.from_numpy(deq).T
        out["output_sqnr_db"] = sqnr_db(ref_out.numpy(), q_out.numpy())
    return out


def _figures_by_rows(w: torch.Tensor, q: QuantizedTensor | torch.Tensor,
                     stats: InputStats | None) -> dict[str, float]:
    """``_figures`` summed over blocks of rows: each is a sum over rows (output channels)."""
    rows = max(1, CHUNK_ELEMS // w.shape[1])
    sums = np.zeros(5)  # weight signal, weight noise, output signal, output noise, zeros
    x = torch.cat(stats.sample) if stats is not None and stats.hessian is None and stats.sample else None
    for i in range(0, w.shape[0], rows):
        r = w[i:i + rows].float()
        d = torch.from_numpy(dequantize_rows(q, i, i + rows))
        e = r - d
        sums[:2] += float((r * r).sum()), float((e * e).sum())
        sums[4] += float((d == 0).sum())
        if stats is not None and stats.hessian is not None:
            sums[2:4] += output_energy(r, stats.hessian), output_energy(e, stats.hessian)
        elif x is not None:
            ref_out = (x @ r.T).double()
            sums[2:4] += float((ref_out ** 2).sum()), float(((ref_out - (x @ d.T).double()) ** 2).sum())
    out = {"weight_sqnr_db": float(10 * np.log10(sums[0] / max(sums[1], 1e-30))), "sparsity": sums[4] / w.numel()}
    if stats is not None and (stats.hessian is not None or x is not None):
        out["output_sqnr_db"] = float(10 * np.log10(sums[2] / max(sums[3], 1e-30)))
    return out


def dequantize_rows(q: QuantizedTensor | torch.Tensor, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of ``q`` as float32 (a hot-row head's int8 rows written over its base rows)."""
    if not isinstance(q, QuantizedTensor):
        return q[start:stop].float().numpy()
    d = q[start:stop].dequantize()
    if isinstance(q, HotRowsTensor):
        inside = np.nonzero((q.rows >= start) & (q.rows < stop))[0]  # type: ignore[operator]
        d[q.rows[inside] - start] = q.hot[inside].dequantize()  # type: ignore[index, union-attr]
    return d


def sqnr_by_rows(ref: np.ndarray, q: QuantizedTensor) -> float:
    """``sqnr32(ref, q.dequantize())`` summed over blocks of rows, so no full-size float copy is made."""
    return _figures_by_rows(torch.from_numpy(ref), q, None)["weight_sqnr_db"]


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
