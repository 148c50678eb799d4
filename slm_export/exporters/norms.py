"""The decoder graph's norms: RMSNorm and LayerNorm, alone or fused with the residual add before them."""

from __future__ import annotations

import numpy as np

from slm_export.exporters.graph import GraphBuilder
from slm_export.exporters.layers import Weights
from slm_export.models.adapters import DecoderSpec


def add_norm(b: GraphBuilder, W: Weights, spec: DecoderSpec, x: str, delta: str | None, wb, name: str,  # type: ignore[no-untyped-def]
             keep_sum: bool = True) -> tuple[str, str]:
    """(norm(x + delta), x + delta); x alone when ``delta`` is None; the sum twice when ``wb`` is None (a
    block without that norm). ONNX Runtime graphs with RMSNorm do both in one
    com.microsoft.SkipSimplifiedLayerNormalization (its fourth output is the sum), which ORT's optimizer does
    not fuse from Add + the RMSNorm pattern by itself: one kernel instead of two per norm."""
    if wb is None:
        total = x if delta is None else b.op("Add", [x, delta])
        return total, total  # type: ignore[return-value]
    if delta is None:
        return norm(b, W, spec, x, wb, name), x
    if W.graph_ops != "onnxruntime" or spec.norm == "layer":
        x = b.op("Add", [x, delta])  # type: ignore[assignment]
        return norm(b, W, spec, x, wb, name), x
    w = norm_weight(W, spec, wb[0], name)
    y, total = b.fresh(f"{name}_out"), (b.fresh(f"{name}_sum") if keep_sum else "")
    b.op_to("SkipSimplifiedLayerNormalization", [delta, x, w], [y, "", "", total] if keep_sum else [y],
            domain="com.microsoft", epsilon=float(spec.eps))
    return y, total


def norm_weight(W: Weights, spec: DecoderSpec, weight, name: str) -> str:  # type: ignore[no-untyped-def]
    """The norm's scale as stored (Gemma-style ``1 + w`` norms folded in)."""
    offset = spec.norm_offset
    return W(f"{name}.weight", lambda: weight + offset if offset else weight)


def norm(b: GraphBuilder, W: Weights, spec: DecoderSpec, x: str, wb, name: str) -> str:  # type: ignore[no-untyped-def]
    """The spec's norm over the last axis; the weight may carry more axes than one (per-head q/k norms
    [heads, head_dim] broadcast over [batch, seq, heads, head_dim])."""
    weight, bias = wb
    w = norm_weight(W, spec, weight, name)
    eps = b.const(np.float32(spec.eps), np.float32)
    if spec.norm == "layer":
        bias_name = W(f"{name}.bias", lambda: bias if bias is not None else np.zeros_like(weight))
        if b.opset >= 17 and np.ndim(weight) == 1:
            return b.op("LayerNormalization", [x, w, bias_name], axis=-1, epsilon=spec.eps)  # type: ignore[return-value]
        x = b.op("Sub", [x, b.reduce_mean(x, [-1])])
    # ONNX Runtime fuses Pow(x, 2) -> ReduceMean -> Add -> Sqrt -> Div -> Mul into one
    # SimplifiedLayerNormalization (not with the residual Add before it: see add_norm); the portable
    # graphs keep x * x.
    square = (b.op("Pow", [x, b.const(np.float32(2.0), np.float32)]) if W.graph_ops == "onnxruntime"
              else b.op("Mul", [x, x]))
    var = b.reduce_mean(square, [-1])  # type: ignore[arg-type]
    y = b.op("Mul", [b.op("Div", [x, b.op("Sqrt", [b.op("Add", [var, eps])])]), w])
    if spec.norm == "layer":
        y = b.op("Add", [y, bias_name])
    return y  # type: ignore[return-value]
