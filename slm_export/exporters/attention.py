"""The decoder graph's attention: the portable form (standard ops, explicit cache Concat) and ONNX Runtime's
fused com.microsoft.GroupQueryAttention, with what the families add: q/k norms, per-layer rotary
embeddings or none, a query scale of the model's own, score soft-capping, and sliding windows (each layer
gets the additive mask of its window)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from slm_export.exporters.graph import GraphBuilder
from slm_export.exporters.layers import Weights, linear
from slm_export.exporters.norms import norm
from slm_export.models.adapters import DecoderSpec

F32 = TensorProto.FLOAT


def scale_of(spec: DecoderSpec) -> float:
    return float(spec.attn_scale) if spec.attn_scale is not None else float(spec.head_dim ** -0.5)


def qk_norms(b: GraphBuilder, W: Weights, spec: DecoderSpec, q: str, k: str, layer, i: int) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """q and k [batch, seq, heads * head_dim] after the layer's q/k norms (none: unchanged): over each head's
    channels, or over the whole projection (``spec.qk_norm == "full"``)."""
    out = []
    for x, wb, heads, name in ((q, layer.q_norm, spec.heads, "q_norm"), (k, layer.k_norm, spec.kv_heads, "k_norm")):
        if wb is None:
            out.append(x)
        elif spec.qk_norm == "full":
            out.append(norm(b, W, spec, x, wb, f"layers.{i}.{name}"))
        else:
            y = b.op("Reshape", [x, b.const([0, 0, heads, spec.head_dim])])
            y = norm(b, W, spec, y, wb, f"layers.{i}.{name}")  # type: ignore[arg-type]
            out.append(b.op("Reshape", [y, b.const([0, 0, heads * spec.head_dim])]))
    return out[0], out[1]


def rotary(b: GraphBuilder, x: str, rope: tuple[str, str], rd: int, d: int) -> str:
    """x [batch, heads, seq, d] rotated on its first ``rd`` channels by the gathered cos and signed sin."""
    cos, sin = rope
    x_rot, x_pass = (b.split(x, [rd, d - rd], axis=-1) if rd < d else (x, None))
    x1, x2 = b.split(x_rot, [rd // 2, rd // 2], axis=-1)
    swapped = b.op("Concat", [x2, x1], axis=-1)
    out = b.op("Add", [b.op("Mul", [x_rot, cos]), b.op("Mul", [swapped, sin])])
    return b.op("Concat", [out, x_pass], axis=-1) if x_pass else out  # type: ignore[return-value]


def _out(b: GraphBuilder, W: Weights, ctx: str, layer, i: int) -> str:  # type: ignore[no-untyped-def]
    return linear(b, W, ctx, f"layers.{i}.o", (layer.o,), (layer.o_bias,) if layer.o_bias is not None else None)


def fused_attention(b: GraphBuilder, W: Weights, spec: DecoderSpec, h: str, layer, i: int,  # type: ignore[no-untyped-def]
                    fused: dict) -> str:  # type: ignore[type-arg]
    """ONNX Runtime graphs: one com.microsoft.GroupQueryAttention per layer (rotary, cache append, grouped
    heads, soft-capping and softmax inside one kernel), on the packed q/k/v projection, or on q, k and v
    apart when q/k norms come between the projection and the rotary embedding."""
    nh, kv, d = spec.heads, spec.kv_heads, spec.head_dim
    qkv = linear(b, W, h, f"layers.{i}.qkv", layer.qkv, layer.qkv_bias)
    qkv_in = [qkv, "", ""]
    if layer.q_norm is not None or layer.k_norm is not None:
        q, k, v = b.split(qkv, [nh * d, kv * d, kv * d], axis=-1)
        q, k = qk_norms(b, W, spec, q, k, layer, i)
        qkv_in = [q, k, v]
    past_k = b.input(f"past_key_values.{i}.key", F32, ["batch", kv, "past", d])
    past_v = b.input(f"past_key_values.{i}.value", F32, ["batch", kv, "past", d])
    cos, sin = fused["ropes"].get(layer.rope, ("", "")) if layer.rope is not None else ("", "")
    ctx = b.fresh(f"layers.{i}.gqa")
    b.ms_opset = True
    extra = {"softcap": float(spec.attn_softcap)} if spec.attn_softcap else {}
    b.op_to("GroupQueryAttention",
            [*qkv_in, past_k, past_v, fused["seqlens_k"], fused["total"], cos, sin,
             fused["position_ids"] if cos else "", fused["masks"][layer.window]],
            [ctx, f"present.{i}.key", f"present.{i}.value"], domain="com.microsoft",
            num_heads=nh, kv_num_heads=kv, do_rotary=int(bool(cos)), rotary_interleaved=0,
            scale=scale_of(spec), **extra)
    return _out(b, W, ctx, layer, i)


def attention(b: GraphBuilder, W: Weights, spec: DecoderSpec, h: str, layer, i: int,  # type: ignore[no-untyped-def]
              mask: str, rope: tuple[str, str] | None, cache: bool = True) -> str:
    """The portable form. Grouped-query attention reshapes the queries into kv-head groups instead of
    repeating the cache, so no step copies the cache more than the one Concat that appends to it."""
    nh, kv, d = spec.heads, spec.kv_heads, spec.head_dim
    qkv = linear(b, W, h, f"layers.{i}.qkv", layer.qkv, layer.qkv_bias)
    q, k, v = b.split(qkv, [nh * d, kv * d, kv * d], axis=-1)
    q, k = qk_norms(b, W, spec, q, k, layer, i)
    perm = [0, 2, 1, 3]
    q = b.op("Transpose", [b.op("Reshape", [q, b.const([0, 0, nh, d])])], perm=perm)
    k = b.op("Transpose", [b.op("Reshape", [k, b.const([0, 0, kv, d])])], perm=perm)
    v = b.op("Transpose", [b.op("Reshape", [v, b.const([0, 0, kv, d])])], perm=perm)
    if rope is not None and layer.rope is not None:
        rd = spec.ropes[layer.rope].dim
        q, k = rotary(b, q, rope, rd, d), rotary(b, k, rope, rd, d)
    if cache:
        k_all, v_all, mask = _cache(b, spec, k, v, layer, i, mask)
    else:
        k_all, v_all = k, v
    q = b.op("Mul", [q, b.const(np.float32(scale_of(spec)), np.float32)])
    grouped = nh != kv
    if grouped:  # [B, nh, S, d] -> [B, kv, rep*S, d]: each kv head serves its group of query heads
        q = b.op("Reshape", [q, b.const([0, kv, -1, d])])
    scores = b.op("MatMul", [q, b.op("Transpose", [k_all], perm=[0, 1, 3, 2])])
    if grouped:
        scores = b.op("Reshape", [scores, b.const([0, nh, -1, 0])])
    if spec.attn_softcap:
        scores = softcap(b, scores, spec.attn_softcap)
    probs = b.op("Softmax", [b.op("Add", [scores, mask])], axis=-1)
    if grouped:
        probs = b.op("Reshape", [probs, b.const([0, kv, -1, 0])])
    ctx = b.op("MatMul", [probs, v_all])
    if grouped:
        ctx = b.op("Reshape", [ctx, b.const([0, nh, -1, d])])
    ctx = b.op("Reshape", [b.op("Transpose", [ctx], perm=perm), b.const([0, 0, nh * d])])
    return _out(b, W, ctx, layer, i)


def _cache(b: GraphBuilder, spec: DecoderSpec, k: str, v: str, layer, i: int,  # type: ignore[no-untyped-def]
           mask: str) -> tuple[str, str, str]:
    """The keys and values attended over (the past, then the new ones) and the mask for them. A windowed
    layer's cache holds no more than its window: its present keeps the latest ``window`` positions (all a
    later query can see), so its past is shorter than the other layers', and its mask is the last columns
    of the full mask, the positions its cache holds."""
    kv, d = spec.kv_heads, spec.head_dim
    past_k = b.input(f"past_key_values.{i}.key", F32, ["batch", kv, f"past_{i}" if layer.window else "past", d])
    past_v = b.input(f"past_key_values.{i}.value", F32, ["batch", kv, f"past_{i}" if layer.window else "past", d])
    if not layer.window:
        b.op_to("Concat", [past_k, k], [f"present.{i}.key"], axis=2)
        b.op_to("Concat", [past_v, v], [f"present.{i}.value"], axis=2)
        return f"present.{i}.key", f"present.{i}.value", mask
    k_all = b.op("Concat", [past_k, k], axis=2)
    v_all = b.op("Concat", [past_v, v], axis=2)
    big = b.const([np.iinfo(np.int64).max])
    last = b.const([-int(layer.window)])
    b.op_to("Slice", [k_all, last, big, b.const([2])], [f"present.{i}.key"])
    b.op_to("Slice", [v_all, last, big, b.const([2])], [f"present.{i}.value"])
    held = b.op("Slice", [b.op("Shape", [k_all]), b.const([2]), b.const([3])])
    mask = b.op("Slice", [mask, b.op("Neg", [held]), big, b.const([3])])
    return k_all, v_all, mask  # type: ignore[return-value]


def softcap(b: GraphBuilder, x: str, cap: float) -> str:
    """cap * tanh(x / cap)."""
    c = b.const(np.float32(cap), np.float32)
    return b.op("Mul", [b.op("Tanh", [b.op("Div", [x, c])]), c])  # type: ignore[return-value]
