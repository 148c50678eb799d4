"""The compress stage's codes and scales as ggml blocks of 32 weights, and float tensors in GGUF's float types.

ggml's layouts (ggml-common.h, ``block_q4_0``, ``block_q4_1``, ``block_q8_0``), each block 32 consecutive
weights of a row (the reduction axis, as our groups run):

- Q4_0: fp16 ``d``, then 16 bytes of nibbles; byte ``j`` holds weight ``j`` in its low nibble and weight
  ``j + 16`` in its high one; ``x = (q - 8) * d``. Our symmetric int4 stores ``codes = round(w / s) + 8``
  and dequantizes ``(codes - 8) * s``: the same codes, ``d = s`` (a signed scale stays signed, as
  llama.cpp's own ``d = max / -8`` is).
- Q4_1: fp16 ``d``, fp16 ``m``, the nibbles as Q4_0; ``x = q * d + m``. Our asymmetric int4
  ``(codes - zero) * s`` is ``codes * s - zero * s``: ``d = s``, ``m = -zero * s``.
- Q8_0: fp16 ``d``, 32 int8; ``x = q * d``. Our symmetric int8 stores ``codes = q + 128``.

A group of 64, 128 ... weights is two, four ... blocks with the same scale. The only change from what the
compress stage measured is the rounding of ``d`` (and ``m``) to fp16; ``weight_difference`` measures it by
dequantizing the blocks with the ``gguf`` package's reference code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from slm_export.calibration.quant import HotRowsTensor, QuantizedTensor
from slm_export.exporters.layers import to_bf16

BLOCK = 32
FP16_MAX = 65504.0


def quant_type(q: QuantizedTensor) -> str:
    """The name of the ggml type that holds ``q`` exactly up to fp16 scales; ValueError with the reason when
    none does."""
    why = quant_refusal(q)
    if why:
        raise ValueError(why)
    if q.bits == 8:
        return "Q8_0"
    return "Q4_0" if q.zeros is None else "Q4_1"


def quant_refusal(q: QuantizedTensor) -> str | None:
    """Why ``q`` has no ggml block type that holds its codes, or None."""
    if isinstance(q, HotRowsTensor):
        return (f"an int{q.bits} LM head with {len(q.rows)} rows at int{q.hot.bits} too (--lm-head-hot) computes "  # type: ignore[arg-type,union-attr]
                "two heads; a GGUF tensor has one type: build with --lm-head-hot 0")
    if q.activations != "float":
        return ("int8 activations (W8A8, --method smoothquant or dynamic): llama.cpp quantizes activations its own "
                "way, so the model validated here is not the one it would run; use a weight-only method")
    if q.bits not in (4, 8):
        return f"int{q.bits} weights: GGUF's blocks take int4 (Q4_0, Q4_1) and int8 (Q8_0)"
    if q.group % BLOCK:
        return (f"group size {q.group}: ggml blocks hold {BLOCK} weights with one scale, so groups must be a "
                f"multiple of {BLOCK} (--group-size 32, 64, 128 ...)")
    if q.bits == 8 and q.zeros is not None:
        return ("asymmetric int8 (zero points): Q8_0, GGUF's int8 block, is symmetric and has no zero point; export "
                "with --symmetric (or keep the LM head float with --lm-head-bits 0)")
    if not np.isfinite(q.scales).all() or np.abs(q.scales).max(initial=0.0) > FP16_MAX:
        return "a group scale beyond fp16's range (65504): GGUF blocks store their scales in fp16"
    return None


def _per_block(x: np.ndarray, group: int) -> np.ndarray:
    """Per-group values ``[out, in // group]`` repeated for each 32-weight block: ``[out, in // 32]``."""
    return np.repeat(x, group // BLOCK, axis=1)


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    """float values ``[out, blocks]`` -> their fp16 bytes ``[out, blocks, 2]`` (little-endian)."""
    return x.astype("<f2").view(np.uint8).reshape(*x.shape, 2)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 codes ``[out, in]`` -> ``[out, blocks, 16]``: weight j low, weight j + 16 high."""
    out_f, in_f = codes.shape
    c = codes.reshape(out_f, in_f // BLOCK, BLOCK)
    return (c[..., :16] & 0x0F) | ((c[..., 16:] & 0x0F) << 4)


def encode(q: QuantizedTensor) -> tuple[str, np.ndarray]:
    """``q`` as ggml blocks: (type name, uint8 ``[out, blocks * block_bytes]``)."""
    kind = quant_type(q)
    out_f = q.shape[0]
    scales = _per_block(q.scales.astype(np.float32), q.group)
    parts = [_fp16_bytes(scales)]
    if kind == "Q4_1":
        zeros = _per_block(q.zeros.astype(np.float32), q.group)  # type: ignore[union-attr]
        parts.append(_fp16_bytes(-zeros * scales))
    if kind == "Q8_0":
        signed = (q.codes.astype(np.int16) - 128).astype(np.int8)
        parts.append(signed.view(np.uint8).reshape(out_f, -1, BLOCK))
    else:
        parts.append(_nibbles(q.codes))
    return kind, np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(out_f, -1))


def float_kind(precision: str, matrix: bool) -> str:
    """The GGUF type of a float weight: matrices at the plan's width, vectors (norms, biases) F32."""
    return {"fp16": "F16", "bf16": "BF16"}.get(precision, "F32") if matrix else "F32"


def float_tensor(w: np.ndarray, precision: str, matrix: bool) -> tuple[str, np.ndarray]:
    """A float weight in the artifact's precision: (type name, data). Matrices of fp16/bf16 plans are stored at
    half width (F16, BF16); vectors (norms, biases) stay F32, holding the half-width values the graph used."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if precision == "fp16":
        half = w.astype(np.float16)
        return ("F16", half) if matrix else ("F32", half.astype(np.float32))
    if precision == "bf16":
        bits = to_bf16(w)
        if matrix:
            return "BF16", bits.view(np.uint8).reshape(*w.shape[:-1], -1)
        return "F32", (bits.astype(np.uint32) << 16).view(np.float32)
    return "F32", w


def measured(w: Any, precision: str) -> np.ndarray:
    """The float32 weights the artifact's graph computes with: a quantized tensor dequantized, a float one in
    the plan's precision (the fp16/bf16 graphs store half-width weights and upcast them)."""
    if isinstance(w, QuantizedTensor):
        return w.dequantize()
    w = np.asarray(w, dtype=np.float32)
    if precision == "fp16":
        return w.astype(np.float16).astype(np.float32)
    if precision == "bf16":
        return (to_bf16(w).astype(np.uint32) << 16).view(np.float32)
    return w


def dequantize(kind: str, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """What llama.cpp reads back: the ``gguf`` package's reference dequantization of ``data``."""
    import gguf

    if kind == "F32":
        return data.reshape(shape)
    if kind == "F16":
        return data.astype(np.float32).reshape(shape)
    values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind])
    return np.asarray(values, dtype=np.float32).reshape(shape)


def weight_difference(kind: str, data: np.ndarray, reference: np.ndarray) -> float:
    """max |GGUF's dequantized weights - the measured ones| (0 where the tensor holds them exactly)."""
    back = dequantize(kind, data, reference.shape)
    return float(np.abs(back.astype(np.float64) - reference.astype(np.float64)).max(initial=0.0))
