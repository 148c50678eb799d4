"""BERT-style encoder -> standard ONNX: last hidden state and mean-pooled sentence embedding.

Inputs:  input_ids, attention_mask, token_type_ids [batch, seq]
Outputs: last_hidden_state [batch, seq, hidden], sentence_embedding [batch, hidden] (masked mean)
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from slm_export.exporters.graph import GraphBuilder
from slm_export.exporters.layers import MASK_VALUE, Weights, activation, linear
from slm_export.models.adapters import EncoderSpec

F32, I64 = TensorProto.FLOAT, TensorProto.INT64


def _layer_norm(b: GraphBuilder, W: Weights, x: str, wb: tuple, name: str, eps: float) -> str:  # type: ignore[type-arg]
    w, bias = W(f"{name}.weight", lambda: wb[0]), W(f"{name}.bias", lambda: wb[1])
    if b.opset >= 17:
        return b.op("LayerNormalization", [x, w, bias], axis=-1, epsilon=eps)  # type: ignore[return-value]
    centered = b.op("Sub", [x, b.reduce_mean(x, [-1])])
    var = b.reduce_mean(b.op("Mul", [centered, centered]), [-1])  # type: ignore[arg-type]
    denom = b.op("Sqrt", [b.op("Add", [var, b.const(np.float32(eps), np.float32)])])
    return b.op("Add", [b.op("Mul", [b.op("Div", [centered, denom]), w]), bias])  # type: ignore[return-value]


def build_encoder(spec: EncoderSpec, opset: int, precision: str) -> GraphBuilder:
    """Build the encoder graph; weights are written when the builder is saved."""
    b = GraphBuilder("bert_encoder", opset)
    W = Weights(b, precision)
    nh, d = spec.heads, spec.hidden // spec.heads
    ids = b.input("input_ids", I64, ["batch", "seq"])
    mask_in = b.input("attention_mask", I64, ["batch", "seq"])
    types = b.input("token_type_ids", I64, ["batch", "seq"])
    seq = b.op("Gather", [b.op("Shape", [ids]), b.const(1)], axis=0)
    x = b.op("Add", [b.op("Gather", [W("embed.word", lambda: spec.word), ids], axis=0),
                     b.op("Gather", [W("embed.type", lambda: spec.token_type), types], axis=0)])
    # The first ``seq`` rows of the position table (a Slice, not a Gather over a Range).
    seq_1d = b.op("Unsqueeze", [seq, b.const([0])])
    x = b.op("Add", [x, b.op("Slice", [W("embed.pos", lambda: spec.pos), b.const([0]), seq_1d, b.const([0])])])
    x = _layer_norm(b, W, x, spec.emb_norm, "embed.norm", spec.eps)
    maskf = b.op("Cast", [mask_in], to=F32)
    additive = b.op("Mul", [b.op("Sub", [b.const(np.float32(1.0), np.float32), maskf]),
                            b.const(np.float32(MASK_VALUE), np.float32)])
    additive = b.op("Unsqueeze", [additive, b.const([1, 2])])
    perm = [0, 2, 1, 3]
    for i, layer in enumerate(spec.layers):
        p = f"layers.{i}"
        qkv = linear(b, W, x, f"{p}.qkv", layer.qkv, layer.qkv_bias)
        q, k, v = (b.op("Transpose", [b.op("Reshape", [t, b.const([0, 0, nh, d])])], perm=perm)
                   for t in b.split(qkv, [spec.hidden] * 3, axis=-1))
        q = b.op("Mul", [q, b.const(np.float32(d ** -0.5), np.float32)])
        scores = b.op("Add", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])]), additive])
        ctx = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])
        ctx = b.op("Reshape", [b.op("Transpose", [ctx], perm=perm), b.const([0, 0, spec.hidden])])
        attn = linear(b, W, ctx, f"{p}.o", (layer.o,), (layer.o_bias,))
        x = _layer_norm(b, W, b.op("Add", [x, attn]), layer.norm1, f"{p}.norm1", spec.eps)
        h = activation(b, linear(b, W, x, f"{p}.fc", (layer.fc,), (layer.fc_bias,)), spec.act)
        x = _layer_norm(b, W, b.op("Add", [x, linear(b, W, h, f"{p}.down", (layer.down,), (layer.down_bias,))]),
                        layer.norm2, f"{p}.norm2", spec.eps)
    b.op_to("Identity", [x], ["last_hidden_state"])
    b.output("last_hidden_state", F32, ["batch", "seq", spec.hidden])
    weights = b.op("Unsqueeze", [maskf, b.const([2])])
    summed = b.op("ReduceSum", [b.op("Mul", [x, weights]), b.const([1])], keepdims=0)
    count = b.op("Max", [b.op("ReduceSum", [weights, b.const([1])], keepdims=0),
                         b.const(np.float32(1e-9), np.float32)])
    b.op_to("Div", [summed, count], ["sentence_embedding"])
    b.output("sentence_embedding", F32, ["batch", spec.hidden])
    return b
