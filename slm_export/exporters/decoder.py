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
meaning (plus the optional ``logits_to_keep``, see ``_keep_last``) but use its fused kernels where decode time goes:
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
from slm_export.exporters.layers import MASK_VALUE, Weights, activation, linear
from slm_export.exporters.quantized import quantized_matmul
from slm_export.exporters.rope_graph import rope_caches, rope_inputs
from slm_export.models.adapters import DecoderSpec
from slm_export.runner.onnx_run import KV_CACHE_KEY, KV_SHARED_BUFFER, LOGITS_TO_KEEP

F32, I64 = TensorProto.FLOAT, TensorProto.INT64


def build_decoder(spec: DecoderSpec, opset: int, precision: str, max_seq_len: int, graph_ops: str = "standard",
                  accuracy_level: int = 4, static_len: int | None = None) -> GraphBuilder:
    """Build the graph; weights are written only when the builder is saved."""
    b = GraphBuilder(f"{spec.model_type}_decoder", opset)
    W = Weights(b, precision, graph_ops, accuracy_level)
    dims = (1, static_len, static_len) if static_len else ("batch", "seq", "total")
    ids = b.input("input_ids", I64, [dims[0], dims[1]])
    mask_in = b.input("attention_mask", I64, [dims[0], dims[2]])
    pos = b.input("position_ids", I64, [dims[0], dims[1]])
    ids_shape, seq, total, mask = _additive_mask(b, ids, mask_in)
    embed, x = _embed(b, W, spec, ids, pos)
    fused_attention = graph_ops == "onnxruntime" and static_len is None and spec.rotary_dim in (0, spec.head_dim)
    rope = None if fused_attention else _rope_inputs(b, spec, pos, max_seq_len)
    fused = None
    if fused_attention:
        fused = _fused_inputs(b, spec, ids_shape, total, pos, mask, max_seq_len)
        # GroupQueryAttention appends in place when past and present are one buffer (capacity x head
        # dim, seqlens_k telling the filled length): the runner then keeps one cache per layer instead
        # of copying the whole cache into a new present every step.
        b.metadata[KV_CACHE_KEY] = KV_SHARED_BUFFER
    x = _blocks(b, W, spec, x, mask, rope, fused, cache=static_len is None)
    logits_seq = dims[1]
    if fused is not None:
        x, ids_shape = _keep_last(b, x, seq)
        logits_seq = "logits_seq"
    _lm_head(b, W, spec, x, embed, ids_shape)
    b.output("logits", F32, [dims[0], logits_seq, spec.vocab])
    return b


def _additive_mask(b: GraphBuilder, ids: str, mask_in: str) -> tuple[str, str, str, str]:
    """The input ids' shape, the new tokens' and the total length, and the additive mask [batch, 1, seq,
    total]: causal over the past and the new tokens, padding (``attention_mask`` 0) hidden."""
    ids_shape = b.op("Shape", [ids])
    seq = b.op("Gather", [ids_shape, b.const(1)], axis=0)
    total = b.op("Gather", [b.op("Shape", [mask_in]), b.const(1)], axis=0)
    past_len = b.op("Sub", [total, seq])
    causal = b.op("LessOrEqual", [b.op("Range", [b.const(0), total, b.const(1)]),
                                  b.op("Unsqueeze", [b.op("Range", [past_len, total, b.const(1)]), b.const([1])])])
    pad = b.op("Unsqueeze", [b.op("Cast", [mask_in], to=TensorProto.BOOL), b.const([1, 2])])
    mask = b.op("Where", [b.op("And", [causal, pad]), b.const(0.0, np.float32), b.const(MASK_VALUE, np.float32)])
    return ids_shape, seq, total, mask  # type: ignore[return-value]


def _embed(b: GraphBuilder, W: Weights, spec: DecoderSpec, ids: str, pos: str) -> tuple[str, str]:
    """The embedding table's name and the embedded tokens (scaled, plus learned positions where the model
    has them)."""
    embed = W("model.embed", lambda: spec.embed)
    x = b.op("Gather", [embed, ids], axis=0)
    if spec.embed_scale != 1.0:
        x = b.op("Mul", [x, b.const(np.float32(spec.embed_scale), np.float32)])
    if spec.pos_embed is not None:
        x = b.op("Add", [x, b.op("Gather", [W("model.pos_embed", lambda: spec.pos_embed), pos], axis=0)])
    return embed, x  # type: ignore[return-value]


def _rope_inputs(b: GraphBuilder, spec: DecoderSpec, pos: str, max_seq_len: int) -> tuple[str, str] | None:
    """cos and signed sin of every position [batch, 1, seq, rotary_dim] (``rope_graph``: the tables, or
    the kind's length-dependent form); None without rotary embeddings."""
    if spec.rope_theta is None:
        return None
    return rope_inputs(b, spec.ropes[0], pos, max_seq_len)


def _blocks(b: GraphBuilder, W: Weights, spec: DecoderSpec, x: str, mask: str, rope: tuple[str, str] | None,
            fused: dict[str, str] | None, cache: bool) -> str:
    """Every transformer block, then the final norm; declares the present outputs when there is a cache."""
    kv, d = spec.kv_heads, spec.head_dim
    delta: str | None = None  # the last block's output, not yet added to the residual stream x
    for i, layer in enumerate(spec.layers):
        p = f"layers.{i}"
        h, x = _add_norm(b, W, spec, x, delta, layer.norm1, f"{p}.norm1")
        if fused is not None:
            attn = _fused_attention(b, W, spec, h, layer, i, fused)
        else:
            attn = _attention(b, W, spec, h, layer, i, mask, rope, cache=cache)
        h, x = _add_norm(b, W, spec, x, attn, layer.norm2, f"{p}.norm2")
        delta = _mlp(b, W, spec, h, layer, p)
        if cache:
            b.output(f"present.{i}.key", F32, ["batch", kv, "total", d])
            b.output(f"present.{i}.value", F32, ["batch", kv, "total", d])
    x, _ = _add_norm(b, W, spec, x, delta, spec.final_norm, "final_norm", keep_sum=False)
    return x


def _lm_head(b: GraphBuilder, W: Weights, spec: DecoderSpec, x: str, embed: str, ids_shape: str) -> None:
    """The ``logits`` output: the tied embedding table, a hot-rows, quantized or float head."""
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


def _hot_rows_head(b: GraphBuilder, W: Weights, x: str, q: HotRowsTensor) -> str:
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
    its multiply-adds, and writes 25 MB of logits, on rows nobody reads.

    ``logits_to_keep`` is an optional input (int64 scalar): a graph input with an initializer of the same
    name holding its default, 0. Callers that feed only what they know (ONNX Runtime GenAI's generator,
    Optimum's ORTModelForCausalLM) get every position's logits, the shape they allocate and read (GenAI
    picks each row's last real token: a trimmed ``[batch, 1, vocab]`` output, its other convention, gave
    right-padded batch rows a padding position's logits). ORT's IOBinding cannot bind an overridable
    initializer, so the project's runner sets the default to 1 for its own sessions (``make_session``)
    and its prefill keeps the saving; its scoring feeds 0. Returns the kept hidden states and their
    [batch, kept] shape."""
    keep_in = b.input(LOGITS_TO_KEEP, I64, [])
    b.init(LOGITS_TO_KEEP, lambda: np.asarray(0, np.int64))
    keep = b.op("Where", [b.op("Equal", [keep_in, b.const(0)]), seq, b.op("Min", [keep_in, seq])])
    start = b.op("Unsqueeze", [b.op("Neg", [keep]), b.const([0])])
    kept = b.op("Slice", [x, start, b.const([np.iinfo(np.int64).max]), b.const([1])])
    return kept, b.op("Slice", [b.op("Shape", [kept]), b.const([0]), b.const([2])])


def _add_norm(b: GraphBuilder, W: Weights, spec: DecoderSpec, x: str, delta: str | None, wb, name: str,  # type: ignore[no-untyped-def]
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


def _norm_weight(W: Weights, spec: DecoderSpec, weight, name: str) -> str:  # type: ignore[no-untyped-def]
    """The norm's scale as stored (Gemma-style ``1 + w`` norms folded in)."""
    offset = spec.norm_offset
    return W(f"{name}.weight", lambda: weight + offset if offset else weight)


def _norm(b: GraphBuilder, W: Weights, spec: DecoderSpec, x: str, wb, name: str) -> str:  # type: ignore[no-untyped-def]
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
        fused["cos"], fused["sin"] = rope_caches(b, spec.ropes[0], pos, max_seq_len)
    return fused


def _fused_attention(b: GraphBuilder, W: Weights, spec: DecoderSpec, h: str, layer, i: int,  # type: ignore[no-untyped-def]
                     fused: dict[str, str]) -> str:
    """ONNX Runtime graphs: one com.microsoft.GroupQueryAttention per layer on the packed q/k/v
    projection (rotary, cache append, grouped heads and softmax inside one kernel)."""
    nh, kv, d = spec.heads, spec.kv_heads, spec.head_dim
    qkv = linear(b, W, h, f"layers.{i}.qkv", layer.qkv, layer.qkv_bias)
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
    return linear(b, W, ctx, f"layers.{i}.o", (layer.o,), (layer.o_bias,) if layer.o_bias is not None else None)


def _attention(b: GraphBuilder, W: Weights, spec: DecoderSpec, h: str, layer, i: int,  # type: ignore[no-untyped-def]
               mask: str, rope: tuple[str, str] | None, cache: bool = True) -> str:
    nh, kv, d = spec.heads, spec.kv_heads, spec.head_dim
    qkv = linear(b, W, h, f"layers.{i}.qkv", layer.qkv, layer.qkv_bias)
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
    return linear(b, W, ctx, f"layers.{i}.o", (layer.o,), (layer.o_bias,) if layer.o_bias is not None else None)


def _rotate(b: GraphBuilder, x: str, rotation: tuple, name: str) -> str:  # type: ignore[type-arg]
    """``x R`` with ``R = diag(signs) . blockdiag(H, ..., H)``: a Mul, then one MatMul per block of
    channels (a Reshape to [..., blocks, b] and back); float32, before the int8 quantization."""
    signs, block = (np.asarray(a, dtype=np.float32) for a in rotation)
    n = block.shape[0]
    y = b.op("Mul", [x, b.init(f"{name}.signs", lambda: signs)])
    y = b.op("Reshape", [y, b.const([0, 0, signs.shape[0] // n, n])])
    y = b.op("MatMul", [y, b.init(f"{name}.block", lambda: block)])
    return b.op("Reshape", [y, b.const([0, 0, signs.shape[0]])])  # type: ignore[return-value]


def _mlp(b: GraphBuilder, W: Weights, spec: DecoderSpec, h: str, layer, p: str) -> str:  # type: ignore[no-untyped-def]
    up = linear(b, W, h, f"{p}.up", layer.up, (layer.up_bias,) if layer.up_bias is not None else None)
    if spec.gated:
        inter = layer.up[0].shape[0]
        gate, up = b.split(up, [inter, inter], axis=-1)
        act = b.op("Mul", [activation(b, gate, spec.act), up])
    else:
        act = activation(b, up, spec.act)
    if layer.down_rotation is not None:
        act = _rotate(b, act, layer.down_rotation, f"{p}.down.rotation")
    bias = (layer.down_bias,) if layer.down_bias is not None else None
    return linear(b, W, act, f"{p}.down", (layer.down,), bias)  # type: ignore[arg-type]
