"""Decoder-only LM -> standard ONNX with a KV cache (past in, present out; one graph for prefill and decode).

Inputs:  input_ids [batch, seq], attention_mask [batch, total], position_ids [batch, seq],
         past_key_values.{i}.key/value [batch, kv_heads, past, head_dim]
Outputs: logits [batch, seq, vocab], present.{i}.key/value [batch, kv_heads, total, head_dim]

Only standard-domain ops, opset 13 and up, so TensorRT, TVM and the FPGA flow can take the same graph.
With ``static_len`` (targets that need static shapes, the DPU flow) every shape is fixed: batch 1,
exactly ``static_len`` tokens (right-padded; the mask hides the padding), and no KV cache inputs or
outputs; a generation loop recomputes the window for each token.
Grouped-query attention is done by reshaping the queries into kv-head groups instead of repeating the
cache, so no step copies the cache more than the one Concat that appends to it.

Graphs for ONNX Runtime (``graph_ops="onnxruntime"``, dynamic shapes) keep the same inputs, outputs and
meaning (plus ``logits_to_keep``, see ``_keep_last``) but use its fused kernels where decode time goes:
one com.microsoft.GroupQueryAttention per layer (rotary, cache append, grouped heads, the additive mask
as attention_bias), the residual add and the RMSNorm after it as one
com.microsoft.SkipSimplifiedLayerNormalization, and the first RMSNorm written as Pow -> ReduceMean -> Add
-> Sqrt -> Div -> Mul, the pattern ORT fuses into SimplifiedLayerNormalization.
Measured on smollm2-135m int4 RTN with an int8 LM head, one thread, ORT's profiler, on a box shared with
other jobs: about 1,500 -> 400 nodes and 44 -> 24 ms per decoded token.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from slm_export.calibration.quant import HotRowsTensor, QuantizedTensor
from slm_export.exporters.graph import GraphBuilder
from slm_export.exporters.quantized import quantized_matmul
from slm_export.models.adapters import DecoderSpec
from slm_export.runner.onnx_run import KV_CACHE_KEY, KV_SHARED_BUFFER, LOGITS_TO_KEEP

F32, I64 = TensorProto.FLOAT, TensorProto.INT64
MASK_VALUE = -1e9  # finite, so a fully masked (left-padding) row cannot turn into NaN


def to_bf16(arr: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(arr), np.uint16(0x7FC0), rounded)


class _Weights:
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


def rope_tables(theta: float, dim: int, max_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and signed sin, [max_pos, dim], computed in float32 the way transformers does."""
    inv_freq = (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(np.float32)
    freqs = np.arange(max_pos, dtype=np.float32)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)
    return np.concatenate([cos, cos], -1), np.concatenate([-sin, sin], -1)


def build_decoder(spec: DecoderSpec, opset: int, precision: str, max_seq_len: int, graph_ops: str = "standard",
                  accuracy_level: int = 4, static_len: int | None = None) -> GraphBuilder:
    """Build the graph; weights are written only when the builder is saved."""
    b = GraphBuilder(f"{spec.model_type}_decoder", opset)
    W = _Weights(b, precision, graph_ops, accuracy_level)
    kv, d = spec.kv_heads, spec.head_dim
    dims = (1, static_len, static_len) if static_len else ("batch", "seq", "total")
    ids = b.input("input_ids", I64, [dims[0], dims[1]])
    mask_in = b.input("attention_mask", I64, [dims[0], dims[2]])
    pos = b.input("position_ids", I64, [dims[0], dims[1]])

    ids_shape = b.op("Shape", [ids])
    seq = b.op("Gather", [ids_shape, b.const(1)], axis=0)
    total = b.op("Gather", [b.op("Shape", [mask_in]), b.const(1)], axis=0)
    past_len = b.op("Sub", [total, seq])
    causal = b.op("LessOrEqual", [b.op("Range", [b.const(0), total, b.const(1)]),
                                  b.op("Unsqueeze", [b.op("Range", [past_len, total, b.const(1)]), b.const([1])])])
    pad = b.op("Unsqueeze", [b.op("Cast", [mask_in], to=TensorProto.BOOL), b.const([1, 2])])
    mask = b.op("Where", [b.op("And", [causal, pad]), b.const(0.0, np.float32), b.const(MASK_VALUE, np.float32)])

    embed = W("model.embed", lambda: spec.embed)
    x = b.op("Gather", [embed, ids], axis=0)
    if spec.embed_scale != 1.0:
        x = b.op("Mul", [x, b.const(np.float32(spec.embed_scale), np.float32)])
    if spec.pos_embed is not None:
        x = b.op("Add", [x, b.op("Gather", [W("model.pos_embed", lambda: spec.pos_embed), pos], axis=0)])
    fused_attention = graph_ops == "onnxruntime" and static_len is None and spec.rotary_dim in (0, spec.head_dim)
    rope = None
    if spec.rope_theta is not None and not fused_attention:
        cos_t, sin_t = rope_tables(spec.rope_theta, spec.rotary_dim, max_seq_len)
        cos = b.op("Unsqueeze", [b.op("Gather", [b.init("rope.cos", lambda: cos_t), pos], axis=0), b.const([1])])
        sin = b.op("Unsqueeze", [b.op("Gather", [b.init("rope.sin", lambda: sin_t), pos], axis=0), b.const([1])])
        rope = (cos, sin)

    fused = None
    if fused_attention:
        fused = _fused_inputs(b, spec, ids_shape, total, pos, mask, max_seq_len)
        # GroupQueryAttention appends in place when past and present are one buffer (capacity x head
        # dim, seqlens_k telling the filled length): the runner then keeps one cache per layer instead
        # of copying the whole cache into a new present every step.
        b.metadata[KV_CACHE_KEY] = KV_SHARED_BUFFER

    delta: str | None = None  # the last block's output, not yet added to the residual stream x
    for i, layer in enumerate(spec.layers):
        p = f"layers.{i}"
        h, x = _add_norm(b, W, spec, x, delta, layer.norm1, f"{p}.norm1")
        if fused is not None:
            attn = _fused_attention(b, W, spec, h, layer, i, fused)
        else:
            attn = _attention(b, W, spec, h, layer, i, mask, rope, cache=static_len is None)
        h, x = _add_norm(b, W, spec, x, attn, layer.norm2, f"{p}.norm2")
        delta = _mlp(b, W, spec, h, layer, p)
        if static_len is None:
            b.output(f"present.{i}.key", F32, ["batch", kv, "total", d])
            b.output(f"present.{i}.value", F32, ["batch", kv, "total", d])

    x, _ = _add_norm(b, W, spec, x, delta, spec.final_norm, "final_norm", keep_sum=False)
    logits_seq = dims[1]
    if fused is not None:
        x, ids_shape = _keep_last(b, x, seq)
        logits_seq = "logits_seq"
    if spec.lm_head is None:  # tied: Gemm with transB reads the embedding table as stored, no copy
        flat = b.op("Reshape", [x, b.const([-1, spec.hidden])])
        logits2d = b.op("Gemm", [flat, embed], transB=1)
        out_shape = b.op("Concat", [ids_shape, b.const([spec.vocab])], axis=0)
        b.op_to("Reshape", [logits2d, out_shape], ["logits"])
    elif isinstance(spec.lm_head, HotRowsTensor):
        b.op_to("Identity", [_hot_rows_head(b, W, x, spec.lm_head)], ["logits"])
    elif isinstance(spec.lm_head, QuantizedTensor):
        y = quantized_matmul(b, x, spec.lm_head, "lm_head.qmatmul", W.graph_ops, W.accuracy_level)
        b.op_to("Identity", [y], ["logits"])
    else:
        b.op_to("MatMul", [x, W("lm_head", lambda: spec.lm_head.T)], ["logits"])  # type: ignore[union-attr]
    b.output("logits", F32, [dims[0], logits_seq, spec.vocab])
    return b


def _hot_rows_head(b: GraphBuilder, W: _Weights, x: str, q: HotRowsTensor) -> str:
    """Every vocabulary row at the base width, then the hot rows' logits (int8) written over theirs: one
    ScatterElements on the vocabulary axis, its indices broadcast to the hot logits' shape."""
    base = quantized_matmul(b, x, q.base, "lm_head.qmatmul", W.graph_ops, W.accuracy_level)
    hot = quantized_matmul(b, x, q.hot, "lm_head.hot.qmatmul", W.graph_ops, W.accuracy_level)  # type: ignore[arg-type]
    rows = b.init("lm_head.hot.rows", lambda: q.rows.reshape(1, 1, -1).astype(np.int64))  # type: ignore[union-attr]
    index = b.op("Expand", [rows, b.op("Shape", [hot])])
    return b.op("ScatterElements", [base, index, hot], axis=-1)  # type: ignore[return-value]


def _keep_last(b: GraphBuilder, x: str, seq: str) -> tuple[str, str]:
    """ONNX Runtime graphs: the LM head runs on the last ``logits_to_keep`` positions only (0 keeps them
    all). A generation loop's prefill needs one row of logits, not one per prompt token: for
    smollm2-135m the head is a fifth of the weights, so a 128-token prompt otherwise spends about a fifth of
    its multiply-adds, and writes 25 MB of logits, on rows nobody reads. A required input (int64 scalar):
    ORT's IOBinding, which the generation loop needs for its in-place cache, cannot bind an overridable
    initializer. Returns the kept hidden states and their [batch, kept] shape."""
    keep_in = b.input(LOGITS_TO_KEEP, I64, [])
    keep = b.op("Where", [b.op("Equal", [keep_in, b.const(0)]), seq, b.op("Min", [keep_in, seq])])
    start = b.op("Unsqueeze", [b.op("Neg", [keep]), b.const([0])])
    kept = b.op("Slice", [x, start, b.const([np.iinfo(np.int64).max]), b.const([1])])
    return kept, b.op("Slice", [b.op("Shape", [kept]), b.const([0]), b.const([2])])


def _add_norm(b: GraphBuilder, W: _Weights, spec: DecoderSpec, x: str, delta: str | None, wb, name: str,  # type: ignore[no-untyped-def]
              keep_sum: bool = True) -> tuple[str, str]:
    """(norm(x + delta), x + delta); x alone when ``delta`` is None. ONNX Runtime graphs with RMSNorm do
    both in one com.microsoft.SkipSimplifiedLayerNormalization (its fourth output is the sum), which ORT's
    optimizer does not fuse from Add + the RMSNorm pattern by itself (ORT 1.32): one kernel instead of
    two per norm, 60 fewer nodes on smollm2-135m."""
    if delta is None:
        return _norm(b, W, spec, x, wb, name), x
    if W.graph_ops != "onnxruntime" or spec.norm == "layer":
        x = b.op("Add", [x, delta])  # type: ignore[assignment]
        return _norm(b, W, spec, x, wb, name), x
    w = _norm_weight(W, spec, wb[0], name)
    y, total = b.fresh(f"{name}_out"), (b.fresh(f"{name}_sum") if keep_sum else "")
    b.op_to("SkipSimplifiedLayerNormalization", [delta, x, w], [y, "", "", total] if keep_sum else [y],
            domain="com.microsoft", epsilon=float(spec.eps))
    return y, total


def _norm_weight(W: _Weights, spec: DecoderSpec, weight, name: str) -> str:  # type: ignore[no-untyped-def]
    """The norm's scale as stored (Gemma-style ``1 + w`` norms folded in)."""
    offset = spec.norm_offset
    return W(f"{name}.weight", lambda: weight + offset if offset else weight)


def _norm(b: GraphBuilder, W: _Weights, spec: DecoderSpec, x: str, wb, name: str) -> str:  # type: ignore[no-untyped-def]
    weight, bias = wb
    w = _norm_weight(W, spec, weight, name)
    eps = b.const(np.float32(spec.eps), np.float32)
    if spec.norm == "layer":
        bias_name = W(f"{name}.bias", lambda: bias)
        if b.opset >= 17:
            return b.op("LayerNormalization", [x, w, bias_name], axis=-1, epsilon=spec.eps)  # type: ignore[return-value]
        x = b.op("Sub", [x, b.reduce_mean(x, [-1])])
    # ONNX Runtime fuses Pow(x, 2) -> ReduceMean -> Add -> Sqrt -> Div -> Mul into one
    # SimplifiedLayerNormalization (not with the residual Add before it: see _add_norm); the portable
    # graphs keep x * x.
    square = (b.op("Pow", [x, b.const(np.float32(2.0), np.float32)]) if W.graph_ops == "onnxruntime"
              else b.op("Mul", [x, x]))
    var = b.reduce_mean(square, [-1])  # type: ignore[arg-type]
    y = b.op("Mul", [b.op("Div", [x, b.op("Sqrt", [b.op("Add", [var, eps])])]), w])
    if spec.norm == "layer":
        y = b.op("Add", [y, bias_name])
    return y  # type: ignore[return-value]


def _linear(b: GraphBuilder, W: _Weights, x: str, name: str, weights: tuple, bias: tuple | None) -> str:  # type: ignore[type-arg]
    """One MatMul for several projections of the same input (q/k/v, gate/up): fewer, larger GEMMs."""
    if isinstance(weights[0], QuantizedTensor):
        scales = {float(w.scales.flat[0]) for w in weights}
        if len(weights) > 1 and all(w.per_tensor for w in weights) and len(scales) > 1:
            # per-tensor scales (the DPU's scheme) differ per projection: one MatMul each, outputs joined
            parts = [quantized_matmul(W.b, x, w, f"{name}.{j}.qmatmul", W.graph_ops, W.accuracy_level)
                     for j, w in enumerate(weights)]
            y = b.op("Concat", parts, axis=-1)
        else:
            q = QuantizedTensor.concat(list(weights))
            y = quantized_matmul(W.b, x, q, f"{name}.qmatmul", W.graph_ops, W.accuracy_level)
        if bias is not None:
            y = b.op("Add", [y, W(f"{name}.bias", lambda: np.concatenate(bias, 0))])
        return y
    w = W(f"{name}.weight", lambda: np.concatenate(weights, 0).T if len(weights) > 1 else weights[0].T)
    y = b.op("MatMul", [x, w])
    if bias is not None:
        y = b.op("Add", [y, W(f"{name}.bias", lambda: np.concatenate(bias, 0))])
    return y  # type: ignore[return-value]


def _rotary(b: GraphBuilder, spec: DecoderSpec, x: str, rope: tuple[str, str]) -> str:
    cos, sin = rope
    rd, d = spec.rotary_dim, spec.head_dim
    x_rot, x_pass = (b.split(x, [rd, d - rd], axis=-1) if rd < d else (x, None))
    x1, x2 = b.split(x_rot, [rd // 2, rd // 2], axis=-1)
    swapped = b.op("Concat", [x2, x1], axis=-1)
    out = b.op("Add", [b.op("Mul", [x_rot, cos]), b.op("Mul", [swapped, sin])])
    return b.op("Concat", [out, x_pass], axis=-1) if x_pass else out  # type: ignore[return-value]


def _fused_inputs(b: GraphBuilder, spec: DecoderSpec, ids_shape: str, total: str, pos: str, mask: str,
                  max_seq_len: int) -> dict[str, str]:
    """What every layer's GroupQueryAttention shares: lengths, the rotary tables, positions, the mask.

    The additive mask (causal and padding) goes in as ``attention_bias`` and the positions as
    ``position_ids``, so left-padded batches mean what they mean in the standard graph; ``seqlens_k``
    is then the full length for every row."""
    i32 = TensorProto.INT32
    total_i32 = b.op("Cast", [total], to=i32)
    batch = b.op("Gather", [ids_shape, b.const([0])], axis=0)
    seqlens = b.op("Expand", [b.op("Sub", [total_i32, b.const(1, np.int32)]), batch])
    fused = {"seqlens_k": seqlens, "total": total_i32, "position_ids": pos, "bias": mask, "cos": "", "sin": ""}
    if spec.rope_theta is not None:
        cos_t, sin_t = rope_tables(spec.rope_theta, spec.rotary_dim, max_seq_len)
        half = spec.rotary_dim // 2
        fused["cos"] = b.init("rope.cos_half", lambda: np.ascontiguousarray(cos_t[:, :half]))
        fused["sin"] = b.init("rope.sin_half", lambda: np.ascontiguousarray(sin_t[:, half:]))
    return fused


def _fused_attention(b: GraphBuilder, W: _Weights, spec: DecoderSpec, h: str, layer, i: int,  # type: ignore[no-untyped-def]
                     fused: dict[str, str]) -> str:
    """ONNX Runtime graphs: one com.microsoft.GroupQueryAttention per layer on the packed q/k/v
    projection (rotary, cache append, grouped heads and softmax inside one kernel)."""
    nh, kv, d = spec.heads, spec.kv_heads, spec.head_dim
    qkv = _linear(b, W, h, f"layers.{i}.qkv", layer.qkv, layer.qkv_bias)
    past_k = b.input(f"past_key_values.{i}.key", F32, ["batch", kv, "past", d])
    past_v = b.input(f"past_key_values.{i}.value", F32, ["batch", kv, "past", d])
    ctx = b.fresh(f"layers.{i}.gqa")
    b.ms_opset = True
    b.op_to("GroupQueryAttention",
            [qkv, "", "", past_k, past_v, fused["seqlens_k"], fused["total"], fused["cos"], fused["sin"],
             fused["position_ids"] if fused["cos"] else "", fused["bias"]],
            [ctx, f"present.{i}.key", f"present.{i}.value"], domain="com.microsoft",
            num_heads=nh, kv_num_heads=kv, do_rotary=int(bool(fused["cos"])), rotary_interleaved=0,
            scale=float(d ** -0.5))
    return _linear(b, W, ctx, f"layers.{i}.o", (layer.o,), (layer.o_bias,) if layer.o_bias is not None else None)


def _attention(b: GraphBuilder, W: _Weights, spec: DecoderSpec, h: str, layer, i: int,  # type: ignore[no-untyped-def]
               mask: str, rope: tuple[str, str] | None, cache: bool = True) -> str:
    nh, kv, d = spec.heads, spec.kv_heads, spec.head_dim
    qkv = _linear(b, W, h, f"layers.{i}.qkv", layer.qkv, layer.qkv_bias)
    q, k, v = b.split(qkv, [nh * d, kv * d, kv * d], axis=-1)
    perm = [0, 2, 1, 3]
    q = b.op("Transpose", [b.op("Reshape", [q, b.const([0, 0, nh, d])])], perm=perm)
    k = b.op("Transpose", [b.op("Reshape", [k, b.const([0, 0, kv, d])])], perm=perm)
    v = b.op("Transpose", [b.op("Reshape", [v, b.const([0, 0, kv, d])])], perm=perm)
    if rope is not None:
        q, k = _rotary(b, spec, q, rope), _rotary(b, spec, k, rope)
    if cache:
        past_k = b.input(f"past_key_values.{i}.key", F32, ["batch", kv, "past", d])
        past_v = b.input(f"past_key_values.{i}.value", F32, ["batch", kv, "past", d])
        b.op_to("Concat", [past_k, k], [f"present.{i}.key"], axis=2)
        b.op_to("Concat", [past_v, v], [f"present.{i}.value"], axis=2)
        k_all, v_all = f"present.{i}.key", f"present.{i}.value"
    else:
        k_all, v_all = k, v
    q = b.op("Mul", [q, b.const(np.float32(d ** -0.5), np.float32)])
    grouped = nh != kv
    if grouped:  # [B, nh, S, d] -> [B, kv, rep*S, d]: each kv head serves its group of query heads
        q = b.op("Reshape", [q, b.const([0, kv, -1, d])])
    scores = b.op("MatMul", [q, b.op("Transpose", [k_all], perm=[0, 1, 3, 2])])
    if grouped:
        scores = b.op("Reshape", [scores, b.const([0, nh, -1, 0])])
    probs = b.op("Softmax", [b.op("Add", [scores, mask])], axis=-1)
    if grouped:
        probs = b.op("Reshape", [probs, b.const([0, kv, -1, 0])])
    ctx = b.op("MatMul", [probs, v_all])
    if grouped:
        ctx = b.op("Reshape", [ctx, b.const([0, nh, -1, d])])
    ctx = b.op("Reshape", [b.op("Transpose", [ctx], perm=perm), b.const([0, 0, nh * d])])
    return _linear(b, W, ctx, f"layers.{i}.o", (layer.o,), (layer.o_bias,) if layer.o_bias is not None else None)


def _act(b: GraphBuilder, x: str, act: str) -> str:
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


def _rotate(b: GraphBuilder, x: str, rotation: tuple, name: str) -> str:  # type: ignore[type-arg]
    """``x R`` with ``R = diag(signs) . blockdiag(H, ..., H)``: a Mul, then one MatMul per block of
    channels (a Reshape to [..., blocks, b] and back); float32, before the int8 quantization."""
    signs, block = (np.asarray(a, dtype=np.float32) for a in rotation)
    n = block.shape[0]
    y = b.op("Mul", [x, b.init(f"{name}.signs", lambda: signs)])
    y = b.op("Reshape", [y, b.const([0, 0, signs.shape[0] // n, n])])
    y = b.op("MatMul", [y, b.init(f"{name}.block", lambda: block)])
    return b.op("Reshape", [y, b.const([0, 0, signs.shape[0]])])  # type: ignore[return-value]


def _mlp(b: GraphBuilder, W: _Weights, spec: DecoderSpec, h: str, layer, p: str) -> str:  # type: ignore[no-untyped-def]
    up = _linear(b, W, h, f"{p}.up", layer.up, (layer.up_bias,) if layer.up_bias is not None else None)
    if spec.gated:
        inter = layer.up[0].shape[0]
        gate, up = b.split(up, [inter, inter], axis=-1)
        act = b.op("Mul", [_act(b, gate, spec.act), up])
    else:
        act = _act(b, up, spec.act)
    if layer.down_rotation is not None:
        act = _rotate(b, act, layer.down_rotation, f"{p}.down.rotation")
    bias = (layer.down_bias,) if layer.down_bias is not None else None
    return _linear(b, W, act, f"{p}.down", (layer.down,), bias)  # type: ignore[arg-type]
