"""Decoder-only LM -> standard ONNX with a KV cache (past in, present out; one graph for prefill and decode).

Inputs:  input_ids [batch, seq], attention_mask [batch, total], position_ids [batch, seq],
         past_key_values.{i}.key/value [batch, kv_heads, past, head_dim]
Outputs: logits [batch, seq, vocab], present.{i}.key/value [batch, kv_heads, total, head_dim]

Only standard-domain ops, opset 13 and up, so TensorRT, TVM and the FPGA flow can take the same graph.
With ``static_len`` (targets that need static shapes, the DPU flow) every shape is fixed: batch 1,
exactly ``static_len`` tokens (right-padded; the mask hides the padding), and no KV cache inputs or
outputs; a generation loop recomputes the window for each token.
The attention (portable and fused forms) is in ``attention.py``, the norms in ``norms.py``.

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
from slm_export.exporters.attention import attention, fused_attention, softcap
from slm_export.exporters.graph import GraphBuilder
from slm_export.exporters.layers import MASK_VALUE, Weights, activation, linear
from slm_export.exporters.norms import add_norm
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
    ids_shape, seq, total, masks = _additive_masks(b, ids, mask_in, {layer.window for layer in spec.layers})
    embed, x = _embed(b, W, spec, ids, pos)
    fused_attention_ok = (graph_ops == "onnxruntime" and static_len is None
                          and all(r.dim == spec.head_dim for r in spec.ropes))
    fused = None
    if fused_attention_ok:
        fused = _fused_inputs(b, spec, ids_shape, total, pos, masks, max_seq_len)
        # GroupQueryAttention appends in place when past and present are one buffer (capacity x head
        # dim, seqlens_k telling the filled length): the runner then keeps one cache per layer instead
        # of copying the whole cache into a new present every step.
        b.metadata[KV_CACHE_KEY] = KV_SHARED_BUFFER
    ropes = {} if fused is not None else _rope_inputs(b, spec, pos, max_seq_len)
    x = _blocks(b, W, spec, x, masks, ropes, fused, cache=static_len is None)
    logits_seq = dims[1]
    if fused is not None:
        x, ids_shape = _keep_last(b, x, seq)
        logits_seq = "logits_seq"
    _lm_head(b, W, spec, x, embed, ids_shape)
    b.output("logits", F32, [dims[0], logits_seq, spec.vocab])
    return b


def _additive_masks(b: GraphBuilder, ids: str, mask_in: str, windows: set[int | None]
                    ) -> tuple[str, str, str, dict[int | None, str]]:
    """The input ids' shape, the new tokens' and the total length, and for each window the layers use the
    additive mask [batch, 1, seq, total]: causal over the past and the new tokens, padding
    (``attention_mask`` 0) hidden, and with a window W only the W latest positions up to the query's own
    (transformers' sliding windows: key index > query index - W)."""
    ids_shape = b.op("Shape", [ids])
    seq = b.op("Gather", [ids_shape, b.const(1)], axis=0)
    total = b.op("Gather", [b.op("Shape", [mask_in]), b.const(1)], axis=0)
    past_len = b.op("Sub", [total, seq])
    keys = b.op("Range", [b.const(0), total, b.const(1)])
    queries = b.op("Unsqueeze", [b.op("Range", [past_len, total, b.const(1)]), b.const([1])])
    causal = b.op("LessOrEqual", [keys, queries])
    allowed = b.op("And", [causal, b.op("Unsqueeze", [b.op("Cast", [mask_in], to=TensorProto.BOOL), b.const([1, 2])])])
    masks = {}
    for window in sorted(windows, key=lambda w: -1 if w is None else w):
        ok = allowed
        if window is not None:
            ok = b.op("And", [allowed, b.op("Less", [b.op("Sub", [queries, keys]), b.const(window)])])
        masks[window] = b.op("Where", [ok, b.const(0.0, np.float32), b.const(MASK_VALUE, np.float32)])
    return ids_shape, seq, total, masks  # type: ignore[return-value]


def _embed(b: GraphBuilder, W: Weights, spec: DecoderSpec, ids: str, pos: str) -> tuple[str, str]:
    """The embedding table's name and the embedded tokens (scaled, projected to the layers' width where the
    model has project_in, plus learned positions where the model has them)."""
    embed = W("model.embed", lambda: spec.embed)
    x = b.op("Gather", [embed, ids], axis=0)
    if spec.embed_scale != 1.0:
        x = b.op("Mul", [x, b.const(np.float32(spec.embed_scale), np.float32)])
    if spec.embed_proj is not None:
        x = b.op("MatMul", [x, W("model.project_in", lambda: spec.embed_proj[0].T)])  # type: ignore[index]
    if spec.pos_embed is not None:
        x = b.op("Add", [x, b.op("Gather", [W("model.pos_embed", lambda: spec.pos_embed), pos], axis=0)])
    return embed, x  # type: ignore[return-value]


def _rope_inputs(b: GraphBuilder, spec: DecoderSpec, pos: str, max_seq_len: int) -> dict[int, tuple[str, str]]:
    """For each rotary embedding of the spec, cos and signed sin of every position [batch, 1, seq, dim]
    (``rope_graph``: gathered from its tables, or the kind's length-dependent form)."""
    return {j: rope_inputs(b, rope, pos, max_seq_len, f"rope{j or ''}") for j, rope in enumerate(spec.ropes)}


def _blocks(b: GraphBuilder, W: Weights, spec: DecoderSpec, x: str, masks: dict[int | None, str],  # type: ignore[type-arg]
            ropes: dict, fused: dict | None, cache: bool) -> str:  # type: ignore[type-arg]
    """Every transformer block, then the final norm; declares the present outputs when there is a cache."""
    kv, d = spec.kv_heads, spec.head_dim
    delta: str | None = None  # the last block's output, not yet added to the residual stream x
    for i, layer in enumerate(spec.layers):
        p = f"layers.{i}"

        def attend(h: str, layer=layer, i=i) -> str:  # type: ignore[no-untyped-def]
            if fused is not None:
                return fused_attention(b, W, spec, h, layer, i, fused)
            rope = ropes.get(layer.rope) if layer.rope is not None else None
            return attention(b, W, spec, h, layer, i, masks[layer.window], rope, cache=cache)

        if spec.post_ln:  # OPT's 350m form: x = norm(x + attn(x)), x = norm(x + mlp(x))
            _, x = add_norm(b, W, spec, x, delta, None, f"{p}.sum")
            x, _ = add_norm(b, W, spec, x, attend(x), layer.norm1, f"{p}.norm1", keep_sum=False)
            delta = _mlp(b, W, spec, x, layer, p)
            x, _ = add_norm(b, W, spec, x, delta, layer.norm2, f"{p}.norm2", keep_sum=False)
            delta = None
        else:
            h, x = add_norm(b, W, spec, x, delta, layer.norm1, f"{p}.norm1")
            attn = _branch(b, W, spec, attend(h), layer.post_norm1, f"{p}.post_norm1")
            if spec.parallel:  # attention and MLP read the block input: x + attn + mlp
                h2 = h if layer.norm2 is None else add_norm(b, W, spec, x, None, layer.norm2, f"{p}.norm2")[0]
                mlp = _branch(b, W, spec, _mlp(b, W, spec, h2, layer, p), layer.post_norm2, f"{p}.post_norm2")
                delta = b.op("Add", [attn, mlp])  # type: ignore[assignment]
            else:
                h, x = add_norm(b, W, spec, x, attn, layer.norm2, f"{p}.norm2")
                delta = _branch(b, W, spec, _mlp(b, W, spec, h, layer, p), layer.post_norm2, f"{p}.post_norm2")
        if cache:
            b.output(f"present.{i}.key", F32, ["batch", kv, "total", d])
            b.output(f"present.{i}.value", F32, ["batch", kv, "total", d])
    x, _ = add_norm(b, W, spec, x, delta, spec.final_norm, "final_norm", keep_sum=False)
    return x


def _branch(b: GraphBuilder, W: Weights, spec: DecoderSpec, y: str, post, name: str) -> str:  # type: ignore[no-untyped-def]
    """A block's attention or MLP output as it joins the residual stream: its post-norm (Gemma 2/3, OLMo 2),
    then the residual multiplier (Granite)."""
    if post is not None:
        y = add_norm(b, W, spec, y, None, post, name)[0]
    if spec.residual_scale != 1.0:
        y = b.op("Mul", [y, b.const(np.float32(spec.residual_scale), np.float32)])  # type: ignore[assignment]
    return y


def _lm_head(b: GraphBuilder, W: Weights, spec: DecoderSpec, x: str, embed: str, ids_shape: str) -> None:
    """The ``logits`` output: the tied embedding table, a hot-rows, quantized or float head; then the head's
    bias, the logit multiplier and the final soft-cap where the model has them."""
    if spec.embed_proj is not None:
        x = b.op("MatMul", [x, W("model.project_out", lambda: spec.embed_proj[1].T)])  # type: ignore[index,assignment]
    if spec.lm_head is None:  # tied: Gemm with transB reads the embedding table as stored, no copy
        flat = b.op("Reshape", [x, b.const([-1, spec.embed.shape[1]])])
        logits2d = b.op("Gemm", [flat, embed], transB=1)
        out_shape = b.op("Concat", [ids_shape, b.const([spec.vocab])], axis=0)
        y = b.op("Reshape", [logits2d, out_shape])
    elif isinstance(spec.lm_head, HotRowsTensor):
        y = _hot_rows_head(b, W, x, spec.lm_head)
    elif isinstance(spec.lm_head, QuantizedTensor):
        y = quantized_matmul(b, x, spec.lm_head, "lm_head.qmatmul", W.graph_ops, W.accuracy_level)
    else:
        y = b.op("MatMul", [x, W("lm_head", lambda: spec.lm_head.T)])  # type: ignore[union-attr]
    if spec.lm_head_bias is not None:
        y = b.op("Add", [y, W("lm_head.bias", lambda: spec.lm_head_bias)])
    if spec.logit_scale != 1.0:
        y = b.op("Mul", [y, b.const(np.float32(spec.logit_scale), np.float32)])
    if spec.final_softcap:
        y = softcap(b, y, spec.final_softcap)
    b.op_to("Identity", [y], ["logits"])


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


def _fused_inputs(b: GraphBuilder, spec: DecoderSpec, ids_shape: str, total: str, pos: str,
                  masks: dict[int | None, str], max_seq_len: int) -> dict:  # type: ignore[type-arg]
    """What every layer's GroupQueryAttention shares: lengths, each rotary embedding's tables, positions,
    the masks.

    The additive masks (causal, padding, windows) go in as ``attention_bias`` and the positions as
    ``position_ids``, so left-padded batches mean what they mean in the standard graph; ``seqlens_k``
    is then the full length for every row."""
    i32 = TensorProto.INT32
    total_i32 = b.op("Cast", [total], to=i32)
    batch = b.op("Gather", [ids_shape, b.const([0])], axis=0)
    seqlens = b.op("Expand", [b.op("Sub", [total_i32, b.const(1, np.int32)]), batch])
    ropes = {j: rope_caches(b, rope, pos, max_seq_len, f"rope{j or ''}") for j, rope in enumerate(spec.ropes)}
    return {"seqlens_k": seqlens, "total": total_i32, "position_ids": pos, "masks": masks, "ropes": ropes}


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
