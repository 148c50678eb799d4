"""Quantized linear layers in ONNX: ORT's MatMulNBits, or standard ops for other runtimes.

- ``onnxruntime`` graphs: com.microsoft.MatMulNBits (codes packed low-first along K, per-block scales,
  packed zero points), with a settable accuracy level (4: int8 compute of the activations).
- standard graphs, opset >= 21: DequantizeLinear with ``block_size`` on (u)int4/uint8 codes, then MatMul.
- standard graphs, older opsets: uint8 codes -> Cast, Sub zero point, Mul scale, then MatMul (every
  runtime runs it; TensorRT and the FPGA flow see the weights' integer grid).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from slm_export.calibration.quant import QuantizedTensor
from slm_export.exporters.graph import GraphBuilder


def pack_codes(q: QuantizedTensor) -> np.ndarray:
    """[N, K] codes -> [N, K/group, group*bits/8] bytes, low nibble first."""
    n, k = q.shape
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


def quantized_matmul(b: GraphBuilder, x: str, q: QuantizedTensor, name: str, graph_ops: str,
                     accuracy_level: int) -> str:
    """``x @ dequant(q).T`` in the form the graph flavour allows."""
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
