"""Encoder spec -> standard ONNX: last hidden state and mean-pooled sentence embedding.

Inputs:  input_ids, attention_mask [batch, seq], and token_type_ids [batch, seq] when the model has more than one
         token type (BERT, MobileBERT; not DistilBERT, RoBERTa or XLM-RoBERTa, whose tokenizers return none)
Outputs: last_hidden_state [batch, seq, hidden], sentence_embedding [batch, hidden] (masked mean)

One builder for the BERT family (``models.encoders.EncoderSpec``): post-LayerNorm layers, with MobileBERT's
bottlenecks, stacked FFNs and NoNorm, RoBERTa's padding-aware position ids and MobileBERT's trigram embedding
taken from the spec where the model has them.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from slm_export.exporters.graph import GraphBuilder
from slm_export.exporters.layers import MASK_VALUE, Weights, activation, linear
from slm_export.models.encoders import Bottleneck, EncoderLayer, EncoderSpec, Norm

F32, I64 = TensorProto.FLOAT, TensorProto.INT64
BIG = np.iinfo(np.int64).max  # a Slice end meaning "to the end of the axis"


def _norm(b: GraphBuilder, W: Weights, x: str, norm: Norm, name: str) -> str:
    w, bias = W(f"{name}.weight", lambda: norm.weight), W(f"{name}.bias", lambda: norm.bias)
    if norm.eps is None:  # MobileBERT's NoNorm: elementwise, no statistics
        return b.op("Add", [b.op("Mul", [x, w]), bias])  # type: ignore[return-value]
    if b.opset >= 17:
        return b.op("LayerNormalization", [x, w, bias], axis=-1, epsilon=norm.eps)  # type: ignore[return-value]
    centered = b.op("Sub", [x, b.reduce_mean(x, [-1])])
    var = b.reduce_mean(b.op("Mul", [centered, centered]), [-1])  # type: ignore[arg-type]
    denom = b.op("Sqrt", [b.op("Add", [var, b.const(np.float32(norm.eps), np.float32)])])
    return b.op("Add", [b.op("Mul", [b.op("Div", [centered, denom]), w]), bias])  # type: ignore[return-value]


def _bottleneck(b: GraphBuilder, W: Weights, x: str, part: Bottleneck, name: str, residual: str | None = None) -> str:
    y = linear(b, W, x, f"{name}.linear", (part.linear[0],), (part.linear[1],))
    return _norm(b, W, b.op("Add", [y, residual]) if residual else y, part.norm, f"{name}.norm")  # type: ignore[arg-type]


def _positions(b: GraphBuilder, W: Weights, spec: EncoderSpec, ids: str) -> str:
    """The position embeddings: the table's first ``seq`` rows (a Slice, not a Gather over a Range), or
    RoBERTa's ids counted over the non-padding tokens from ``padding_idx + 1`` (padding tokens get
    ``padding_idx``), gathered."""
    table = W("embed.pos", lambda: spec.pos)
    pad = spec.position_padding_idx
    if pad is None:
        seq = b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", [ids]), b.const(1)], axis=0), b.const([0])])
        return b.op("Slice", [table, b.const([0]), seq, b.const([0])])  # type: ignore[return-value]
    real = b.op("Cast", [b.op("Not", [b.op("Equal", [ids, b.const(pad)])])], to=I64)
    counted = b.op("Mul", [b.op("CumSum", [real, b.const(1)]), real])
    return b.op("Gather", [table, b.op("Add", [counted, b.const(pad)])], axis=0)  # type: ignore[return-value]


def _trigram(b: GraphBuilder, x: str) -> str:
    """[next token's embedding, its own, previous token's] along the channels, zeros past either end."""
    after = b.op("Pad", [b.op("Slice", [x, b.const([1]), b.const([BIG]), b.const([1])]), b.const([0, 0, 0, 0, 1, 0])])
    before = b.op("Pad", [b.op("Slice", [x, b.const([0]), b.const([-1]), b.const([1])]), b.const([0, 1, 0, 0, 0, 0])])
    return b.op("Concat", [after, x, before], axis=2)  # type: ignore[return-value]


def _embeddings(b: GraphBuilder, W: Weights, spec: EncoderSpec, ids: str) -> str:
    x = b.op("Gather", [W("embed.word", lambda: spec.word), ids], axis=0)
    if spec.trigram:
        x = _trigram(b, x)  # type: ignore[arg-type]
    if spec.embed_proj is not None:
        x = linear(b, W, x, "embed.proj", (spec.embed_proj[0],), (spec.embed_proj[1],))  # type: ignore[arg-type]
    if spec.token_type_input:
        types = b.input("token_type_ids", I64, ["batch", "seq"])
        x = b.op("Add", [x, b.op("Gather", [W("embed.type", lambda: spec.token_type), types], axis=0)])
    elif spec.token_type is not None:  # a single type: its row is added to every token
        x = b.op("Add", [x, W("embed.type", lambda: spec.token_type[0])])  # type: ignore[index]
    x = b.op("Add", [x, _positions(b, W, spec, ids)])
    return _norm(b, W, x, spec.emb_norm, "embed.norm")  # type: ignore[arg-type]


def _attention(b: GraphBuilder, W: Weights, layer: EncoderLayer, sources: dict[str, str], heads: int,
               additive: str, p: str) -> str:
    """Multi-head attention; projections reading the same source share one MatMul."""
    width = layer.qkv[0].shape[0]
    d = width // heads
    proj: list[str] = ["", "", ""]
    for src in dict.fromkeys(layer.qkv_from):
        idx = [i for i, s in enumerate(layer.qkv_from) if s == src]
        y = linear(b, W, sources[src], f"{p}.{''.join('qkv'[i] for i in idx)}",
                   tuple(layer.qkv[i] for i in idx), tuple(layer.qkv_bias[i] for i in idx))
        parts = b.split(y, [width] * len(idx), axis=-1) if len(idx) > 1 else [y]
        for i, part in zip(idx, parts, strict=True):
            proj[i] = part
    perm = [0, 2, 1, 3]
    q, k, v = (b.op("Transpose", [b.op("Reshape", [t, b.const([0, 0, heads, d])])], perm=perm) for t in proj)
    q = b.op("Mul", [q, b.const(np.float32(d ** -0.5), np.float32)])
    scores = b.op("Add", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])]), additive])
    ctx = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])
    ctx = b.op("Reshape", [b.op("Transpose", [ctx], perm=perm), b.const([0, 0, width])])
    return linear(b, W, ctx, f"{p}.o", (layer.o,), (layer.o_bias,))  # type: ignore[arg-type]


def _layer(b: GraphBuilder, W: Weights, spec: EncoderSpec, layer: EncoderLayer, x: str, additive: str,
           p: str) -> str:
    sources = {"x": x}
    if layer.bottleneck_in is not None:
        sources["input"] = _bottleneck(b, W, x, layer.bottleneck_in, f"{p}.bottleneck_in")
    if layer.bottleneck_attn is not None:
        sources["shared"] = _bottleneck(b, W, x, layer.bottleneck_attn, f"{p}.bottleneck_attn")
    attn = _attention(b, W, layer, sources, spec.heads, additive, p)
    h = _norm(b, W, b.op("Add", [sources[layer.residual_from], attn]), layer.norm1, f"{p}.norm1")  # type: ignore[arg-type]
    for j, ffn in enumerate(layer.ffns):
        y = activation(b, linear(b, W, h, f"{p}.ffn{j}.fc", (ffn.fc[0],), (ffn.fc[1],)), spec.act)
        y = linear(b, W, y, f"{p}.ffn{j}.down", (ffn.down[0],), (ffn.down[1],))
        h = _norm(b, W, b.op("Add", [y, h]), ffn.norm, f"{p}.ffn{j}.norm")  # type: ignore[arg-type]
    y = activation(b, linear(b, W, h, f"{p}.fc", (layer.fc,), (layer.fc_bias,)), spec.act)
    y = linear(b, W, y, f"{p}.down", (layer.down,), (layer.down_bias,))
    h = _norm(b, W, b.op("Add", [h, y]), layer.norm2, f"{p}.norm2")  # type: ignore[arg-type]
    if layer.bottleneck_out is not None:
        h = _bottleneck(b, W, h, layer.bottleneck_out, f"{p}.bottleneck_out", residual=x)
    return h


def build_encoder(spec: EncoderSpec, opset: int, precision: str) -> GraphBuilder:
    """Build the encoder graph; weights are written when the builder is saved."""
    b = GraphBuilder("encoder", opset)
    W = Weights(b, precision)
    ids = b.input("input_ids", I64, ["batch", "seq"])
    mask_in = b.input("attention_mask", I64, ["batch", "seq"])
    x = _embeddings(b, W, spec, ids)
    maskf = b.op("Cast", [mask_in], to=F32)
    additive = b.op("Mul", [b.op("Sub", [b.const(np.float32(1.0), np.float32), maskf]),
                            b.const(np.float32(MASK_VALUE), np.float32)])
    additive = b.op("Unsqueeze", [additive, b.const([1, 2])])
    for i, layer in enumerate(spec.layers):
        x = _layer(b, W, spec, layer, x, additive, f"layers.{i}")  # type: ignore[arg-type]
    b.op_to("Identity", [x], ["last_hidden_state"])
    b.output("last_hidden_state", F32, ["batch", "seq", spec.hidden])
    weights = b.op("Unsqueeze", [maskf, b.const([2])])
    summed = b.op("ReduceSum", [b.op("Mul", [x, weights]), b.const([1])], keepdims=0)
    count = b.op("Max", [b.op("ReduceSum", [weights, b.const([1])], keepdims=0),
                         b.const(np.float32(1e-9), np.float32)])
    b.op_to("Div", [summed, count], ["sentence_embedding"])
    b.output("sentence_embedding", F32, ["batch", spec.hidden])
    return b
