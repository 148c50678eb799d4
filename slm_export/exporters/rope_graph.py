"""Rotary cos/sin in the decoder graphs, following transformers' length-dependent kinds in-graph.

transformers reads the call's length as ``max(position_ids) + 1`` over the whole batch
(``dynamic_rope_update``): ``longrope`` uses its long factors once that passes
``original_max_position_embeddings``, and ``dynamic`` recomputes its base from that length once it passes
``max_position_embeddings``. The graphs do the same on every call: longrope holds both tables and picks
one with a Where; dynamic computes its frequencies from the length in float32, the steps transformers
takes. Keys already in the cache keep the rotation they were written with, as in transformers.
A graph whose context (``max_len``) never passes the boundary holds the one table that applies.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from slm_export.exporters.graph import GraphBuilder
from slm_export.models.rope import Rope

F32 = np.float32


def _call_len(b: GraphBuilder, pos: str) -> str:
    """``max(position_ids) + 1``, an int64 scalar."""
    return b.op("Add", [b.op("ReduceMax", [pos], keepdims=0), b.const(1)])  # type: ignore[return-value]


def _past_switch(b: GraphBuilder, rope: Rope, pos: str) -> str:
    """A bool scalar: this call's length is past the rope's ``switch_len``."""
    return b.op("Greater", [_call_len(b, pos), b.const(rope.switch_len)])  # type: ignore[return-value]


def _dynamic_inv_freq(b: GraphBuilder, rope: Rope, pos: str) -> str:
    """dynamic's inverse frequencies [dim/2] for this call: the fixed ones up to ``max_position_embeddings``,
    past it ``1 / (theta * (factor * L / limit - (factor - 1)) ** (dim / (dim - 2))) ** (arange / dim)``."""
    factor, limit = rope.param("factor"), rope.param("max_position_embeddings")
    length = b.op("Cast", [_call_len(b, pos)], to=TensorProto.FLOAT)
    ratio = b.op("Sub", [b.op("Div", [b.op("Mul", [length, b.const(F32(factor), F32)]), b.const(F32(limit), F32)]),
                         b.const(F32(factor - 1), F32)])
    base = b.op("Mul", [b.const(F32(rope.theta), F32),
                        b.op("Pow", [ratio, b.const(F32(rope.dim / (rope.dim - 2)), F32)])])
    scaled = b.op("Div", [b.const(F32(1.0), F32), b.op("Pow", [base, b.const(rope.exponents(), F32)])])
    fixed = b.const(rope.inv_freq(), F32)
    return b.op("Where", [_past_switch(b, rope, pos), scaled, fixed])  # type: ignore[return-value]


def _scaled(b: GraphBuilder, rope: Rope, x: str) -> str:
    scale = rope.attention_scaling
    return x if scale == 1.0 else b.op("Mul", [x, b.const(F32(scale), F32)])  # type: ignore[return-value]


def rope_inputs(b: GraphBuilder, rope: Rope, pos: str, max_len: int, name: str = "rope") -> tuple[str, str]:
    """cos and signed sin of every position, [batch, 1, seq, rotary_dim]; ``name`` prefixes the tables."""
    if rope.kind == "dynamic" and rope.length_dependent(max_len):
        freqs = b.op("Mul", [b.op("Unsqueeze", [b.op("Cast", [pos], to=TensorProto.FLOAT), b.const([-1])]),
                             _dynamic_inv_freq(b, rope, pos)])
        cos, sin = _scaled(b, rope, b.op("Cos", [freqs])), _scaled(b, rope, b.op("Sin", [freqs]))  # type: ignore[arg-type]
        cos = b.op("Concat", [cos, cos], axis=-1)
        sin = b.op("Concat", [b.op("Neg", [sin]), sin], axis=-1)
    else:
        cos_t, sin_t = rope.tables(max_len)
        cos = b.op("Gather", [b.init(f"{name}.cos", lambda: cos_t), pos], axis=0)
        sin = b.op("Gather", [b.init(f"{name}.sin", lambda: sin_t), pos], axis=0)
        if rope.kind == "longrope" and rope.length_dependent(max_len):
            cos_l, sin_l = rope.tables(max_len, seq_len=max_len)
            long = _past_switch(b, rope, pos)
            cos = b.op("Where", [long, b.op("Gather", [b.init(f"{name}.cos_long", lambda: cos_l), pos], axis=0), cos])
            sin = b.op("Where", [long, b.op("Gather", [b.init(f"{name}.sin_long", lambda: sin_l), pos], axis=0), sin])
    return b.op("Unsqueeze", [cos, b.const([1])]), b.op("Unsqueeze", [sin, b.const([1])])  # type: ignore[return-value]


def rope_caches(b: GraphBuilder, rope: Rope, pos: str, max_len: int, name: str = "rope") -> tuple[str, str]:
    """ONNX Runtime's GroupQueryAttention caches: cos and sin of positions 0 .. max_len - 1, [max_len,
    rotary_dim / 2], as this call's length makes them (graph values for the length-dependent kinds); ``name``
    prefixes the tables."""
    half = rope.dim // 2
    if rope.kind == "dynamic" and rope.length_dependent(max_len):
        positions = b.const(np.arange(max_len, dtype=F32)[:, None], F32)
        freqs = b.op("Mul", [positions, _dynamic_inv_freq(b, rope, pos)])
        return _scaled(b, rope, b.op("Cos", [freqs])), _scaled(b, rope, b.op("Sin", [freqs]))  # type: ignore[arg-type]
    cos_t, sin_t = rope.tables(max_len)
    cos = b.init(f"{name}.cos_half", lambda: np.ascontiguousarray(cos_t[:, :half]))
    sin = b.init(f"{name}.sin_half", lambda: np.ascontiguousarray(sin_t[:, half:]))
    if rope.kind == "longrope" and rope.length_dependent(max_len):
        cos_l, sin_l = rope.tables(max_len, seq_len=max_len)
        long = _past_switch(b, rope, pos)
        cos = b.op("Where", [long, b.init(f"{name}.cos_half_long", lambda: np.ascontiguousarray(cos_l[:, :half])), cos])
        sin = b.op("Where", [long, b.init(f"{name}.sin_half_long", lambda: np.ascontiguousarray(sin_l[:, half:])), sin])
    return cos, sin  # type: ignore[return-value]
