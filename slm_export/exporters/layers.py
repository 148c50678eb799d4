"""Graph pieces the decoder and encoder builders share: weights in the artifact's precision, linears
(float or quantized), activations, the rotary tables and the additive mask value.

The TVM and ExecuTorch rebuilds read ``MASK_VALUE`` too (and ``models.rope.Rope.tables``), so that every
backend's decoder computes the same tables and masks the same way as the ONNX graph.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from slm_export.calibration.quant import QuantizedTensor
from slm_export.exporters.graph import GraphBuilder
from slm_export.exporters.quantized import quantized_matmul

F32 = TensorProto.FLOAT
MASK_VALUE = -1e9  # finite, so a fully masked (left-padding) row cannot turn into NaN


def to_bf16(arr: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(arr), np.uint16(0x7FC0), rounded)


class Weights:
    """Stores weights in the artifact's precision (fp32, fp16 or bf16) and hands back float32 tensor
    names: a half-width weight is upcast by a Cast right after it, so every op (norms, softmax, rotary,
    residual adds) computes in float32 and only storage and reads are halved. TensorRT's builder picks
    fp16 kernels for the GEMMs itself under --fp16 and keeps the rest where it must."""

    def __init__(self, b: GraphBuilder, precision: str, graph_ops: str = "standard", accuracy_level: int = 4) -> None:
        self.b, self.precision = b, precision if precision in ("fp16", "bf16") else "fp32"
        self.graph_ops, self.accuracy_level = graph_ops, accuracy_level

    def __call__(self, name: str, fn) -> str:  # type: ignore[no-untyped-def]
        if self.precision == "fp32":
            return self.b.init(name, lambda: np.asarray(fn(), dtype=np.float32))
        if self.precision == "fp16":
            init = self.b.init(name, lambda: np.asarray(fn(), dtype=np.float32).astype(np.float16))
        else:
            init = self.b.init(name, lambda: to_bf16(np.asarray(fn(), dtype=np.float32)), elem=TensorProto.BFLOAT16)
        return self.b.op("Cast", [init], to=F32, name=name + "_f32")  # type: ignore[return-value]


def linear(b: GraphBuilder, W: Weights, x: str, name: str, weights: tuple, bias: tuple | None) -> str:  # type: ignore[type-arg]
    """One MatMul for several projections of the same input (q/k/v, gate/up): fewer, larger GEMMs."""
    if isinstance(weights[0], QuantizedTensor):
        scales = {float(w.scales.flat[0]) for w in weights}
        if len(weights) > 1 and all(w.per_tensor for w in weights) and len(scales) > 1:
            # per-tensor scales (the DPU's scheme) differ per projection: one MatMul each, outputs joined
            parts = [quantized_matmul(W.b, x, w, f"{name}.{j}.qmatmul", W.graph_ops, W.accuracy_level)
                     for j, w in enumerate(weights)]
            y = b.op("Concat", parts, axis=-1)
        else:
            q = QuantizedTensor.joined(list(weights))
            y = quantized_matmul(W.b, x, q, f"{name}.qmatmul", W.graph_ops, W.accuracy_level)
        if bias is not None:
            y = b.op("Add", [y, W(f"{name}.bias", lambda: np.concatenate(bias, 0))])
        return y
    w = W(f"{name}.weight", lambda: np.concatenate(weights, 0).T if len(weights) > 1 else weights[0].T)
    y = b.op("MatMul", [x, w])
    if bias is not None:
        y = b.op("Add", [y, W(f"{name}.bias", lambda: np.concatenate(bias, 0))])
    return y  # type: ignore[return-value]


def activation(b: GraphBuilder, x: str, act: str) -> str:
    if act == "silu":
        return b.op("Mul", [x, b.op("Sigmoid", [x])])  # type: ignore[return-value]
    if act == "relu":
        return b.op("Relu", [x])  # type: ignore[return-value]
    half = b.const(np.float32(0.5), np.float32)
    one = b.const(np.float32(1.0), np.float32)
    if act == "gelu":
        inner = b.op("Erf", [b.op("Mul", [x, b.const(np.float32(2 ** -0.5), np.float32)])])
    else:  # tanh approximation
        cube = b.op("Mul", [b.op("Mul", [x, x]), x])
        poly = b.op("Add", [x, b.op("Mul", [cube, b.const(np.float32(0.044715), np.float32)])])
        inner = b.op("Tanh", [b.op("Mul", [poly, b.const(np.float32((2 / np.pi) ** 0.5), np.float32)])])
    return b.op("Mul", [b.op("Mul", [x, half]), b.op("Add", [inner, one])])  # type: ignore[return-value]
