"""Quantized linear layers in ONNX: ORT's MatMulNBits, or standard ops for other runtimes.

- ``onnxruntime`` graphs: com.microsoft.MatMulNBits (codes packed low-first along K, per-block scales,
  packed zero points), with a settable accuracy level (4: int8 compute of the activations).
- standard graphs, opset >= 21: DequantizeLinear with ``block_size`` on (u)int4/uint8 codes, then MatMul.
- standard graphs, older opsets: uint8 codes -> Cast, Sub zero point, Mul scale, then MatMul (every
  runtime runs it; TensorRT and the FPGA flow see the weights' integer grid).
- W8A8 static (any graph): QuantizeLinear/DequantizeLinear on the activation with its calibrated
  per-tensor scale, DequantizeLinear on int8 weights (per channel, axis 1, or per tensor), then MatMul:
  the explicit Q/DQ form TensorRT and the DPU flow turn into int8 GEMMs (ORT fuses it on CPU too).
- W8A8 dynamic (any graph): per-token scale max|x|/127 computed in the graph, int8 activations,
  MatMulInteger against int8 weights, then the int32 result times both scales.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from slm_export.calibration.quant import QuantizedTensor
from slm_export.exporters.graph import GraphBuilder


def pack_codes(q: QuantizedTensor) -> np.ndarray:
    """[N, K] codes -> [N, K/group, group*bits/8] bytes, low nibble first."""
    n, k = q.shape
    held = q.nibbles() if q.bits == 4 else None  # already in this layout: no unpacking and repacking
    if held is not None:
        return np.ascontiguousarray(held.reshape(n, k // q.group, -1))
    codes = q.codes
    if q.bits == 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    elif q.bits != 8:
        raise ValueError(f"{q.bits}-bit codes are stored only as 4 or 8 bits")
    return np.ascontiguousarray(codes.reshape(n, k // q.group, -1))


def _pack_zeros(q: QuantizedTensor) -> np.ndarray:
    z = q.zero_points
    if q.bits == 8:
        return z.reshape(-1)
    n, nb = z.shape
    if nb % 2:
        z = np.concatenate([z, np.zeros((n, 1), np.uint8)], 1)
    return (z[:, 0::2] | (z[:, 1::2] << 4)).reshape(-1)


def _int8_weight(b: GraphBuilder, q: QuantizedTensor, name: str) -> tuple[str, str]:
    """int8 weights as ``[in, out]`` (MatMul's layout) with their symmetric scale(s)."""
    if q.bits != 8 or q.zeros is not None:
        raise ValueError("W8A8 needs symmetric int8 weights")
    w = b.init(f"{name}.qweight", lambda: np.ascontiguousarray((q.codes.astype(np.int16) - 128).astype(np.int8).T))
    if q.per_tensor:
        return w, b.const(np.float32(q.scales.flat[0]), np.float32)
    return w, b.init(f"{name}.scales", lambda: q.scales[:, 0].astype(np.float32))


def _w8a8_matmul(b: GraphBuilder, x: str, q: QuantizedTensor, name: str) -> str:
    w, w_scale = _int8_weight(b, q, name)
    if q.act_scale is not None:
        w_zero = b.const(np.int8(0) if q.per_tensor else np.zeros(q.shape[0], np.int8), np.int8)
        a_scale, a_zero = b.const(np.float32(q.act_scale), np.float32), b.const(np.int8(0), np.int8)
        xq = b.op("QuantizeLinear", [x, a_scale, a_zero], name=f"{name}.act_q")
        xd = b.op("DequantizeLinear", [xq, a_scale, a_zero], name=f"{name}.act_dq")
        axis = {} if q.per_tensor else {"axis": 1}
        wd = b.op("DequantizeLinear", [w, w_scale, w_zero], name=f"{name}.weight_dq", **axis)
        return b.op("MatMul", [xd, wd], name=name)  # type: ignore[return-value]
    # dynamic: one scale per token (row), computed at run time
    amax = b.reduce_max(b.op("Abs", [x]), [-1])
    eps, qmax = b.const(np.float32(1e-8), np.float32), b.const(np.float32(127), np.float32)
    scale = b.op("Div", [b.op("Max", [amax, eps]), qmax])
    rounded = b.op("Round", [b.op("Div", [x, scale])])
    clipped = b.op("Clip", [rounded, b.const(np.float32(-127), np.float32), b.const(np.float32(127), np.float32)])
    xq = b.op("Cast", [clipped], to=TensorProto.INT8)
    acc = b.op("MatMulInteger", [xq, w], name=name)
    y = b.op("Mul", [b.op("Cast", [acc], to=TensorProto.FLOAT), scale])
    return b.op("Mul", [y, w_scale])  # type: ignore[return-value]


def quantized_matmul(b: GraphBuilder, x: str, q: QuantizedTensor, name: str, graph_ops: str,
                     accuracy_level: int) -> str:
    """``x @ dequant(q).T`` in the form the graph flavour allows."""
    if q.activations != "float":
        return _w8a8_matmul(b, x, q, name)
    n, k = q.shape
    stored_bits = 4 if q.bits <= 4 else 8
    if q.bits not in (4, 8):  # int3 (and other widths) ride in 4-bit storage: same codes, wider container
        q = QuantizedTensor(q.codes, q.scales, q.zero_points, stored_bits, q.group)
    if graph_ops == "onnxruntime":
        inputs = [x, b.init(f"{name}.qweight", lambda: pack_codes(q)),
                  b.init(f"{name}.scales", lambda: q.scales.reshape(-1).astype(np.float32))]
        if q.zeros is not None:
            inputs.append(b.init(f"{name}.qzeros", lambda: _pack_zeros(q)))
        b.ms_opset = True
        return b.op("MatMulNBits", inputs, domain="com.microsoft", name=name, K=k, N=n, bits=q.bits,  # type: ignore[return-value]
                    block_size=q.group, accuracy_level=accuracy_level)
    if b.opset >= 21:
        elem = TensorProto.UINT4 if q.bits == 4 else TensorProto.UINT8
        codes = b.init(f"{name}.qweight", lambda: q.codes.astype(np.uint8), elem=elem)
        zeros = b.init(f"{name}.qzeros", lambda: q.zero_points.astype(np.uint8), elem=elem)
        scales = b.init(f"{name}.scales", lambda: q.scales.astype(np.float32))
        w = b.op("DequantizeLinear", [codes, scales, zeros], axis=1, block_size=q.group)
    else:
        codes = b.init(f"{name}.qweight", lambda: q.codes.reshape(n, k // q.group, q.group))
        zeros = b.init(f"{name}.qzeros", lambda: q.zero_points.astype(np.float32)[..., None])
        scales = b.init(f"{name}.scales", lambda: q.scales.astype(np.float32)[..., None])
        deq = b.op("Mul", [b.op("Sub", [b.op("Cast", [codes], to=TensorProto.FLOAT), zeros]), scales])
        w = b.op("Reshape", [deq, b.const([n, k])])
    return b.op("MatMul", [x, b.op("Transpose", [w], perm=[1, 0])])  # type: ignore[return-value]
