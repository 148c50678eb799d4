"""What the two PyTorch rebuilds of the decoder share (ExecuTorch's ``executorch/torch_decoder.py`` and TVM's
``tvm/torch_decoder.py``): the norms (q/k norms per head or over the whole projection included), the rotary
embedding, a block's residual wiring, its MLP, the embedding and the LM head.

Each piece reads the ``DecoderSpec`` fields the way the ONNX builder does (``exporters/decoder.py``:
``_blocks``, ``_branch``, ``_embed``, ``_lm_head``), so every backend computes the same function: pre-norm,
parallel and post-LN blocks, norms that a family leaves out (None), post-norms and the residual multiplier on
each branch, an embedding multiplier and projection, a head bias, logit multiplier and final soft-cap. Each
backend brings its own linear (a factory ``linear(weight, bias) -> Module``) and its own attention.

``unsupported_ropes`` names what neither rebuild can build: rotary tables that change with the call's length
(``models.rope.Rope.switch_len``) where the context reaches past the change, which a program with tables fixed
at export cannot follow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slm_export.models.adapters import DecoderSpec


def unsupported_ropes(spec: DecoderSpec, max_len: int) -> str | None:
    """Why the rebuilds cannot take the spec's rotary embeddings for ``max_len`` positions, or None: their
    tables are computed once, at export, so a rope whose frequencies change with the call's length
    (``Rope.switch_len``: dynamic, longrope) is refused where the context reaches past that change."""
    for rope in spec.ropes:
        if rope.length_dependent(max_len):
            return (f"rope_type {rope.kind!r} for {max_len} positions (transformers changes its frequencies once "
                    f"a call passes {rope.switch_len} positions; this backend's rotary tables are fixed at export)")
    return None


def param(a: Any, dtype: Any = np.float32) -> Any:
    return torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)), requires_grad=False)


def concat(ws: tuple[Any, ...]) -> Any:
    """Projections of one input (q/k/v, gate/up) as one weight."""
    from slm_export.calibration.quant import QuantizedTensor

    if len(ws) == 1:
        return ws[0]
    if isinstance(ws[0], QuantizedTensor):
        return QuantizedTensor.concat(list(ws))
    return np.concatenate(ws, 0)


def activation(x: Any, act: str) -> Any:
    if act == "silu":
        return x * torch.sigmoid(x)
    if act == "relu":
        return F.relu(x)
    return F.gelu(x, approximate="tanh" if act == "gelu_tanh" else "none")


def softcap(x: Any, cap: float) -> Any:
    """cap * tanh(x / cap)."""
    return torch.tanh(x / cap) * cap


def rotary(x: Any, cos: Any, sin: Any, rd: int, d: int) -> Any:
    """x [B, S, H, d] rotated on its first ``rd`` channels; cos and signed sin broadcast to [B, S, 1, rd]."""
    # split, not slices: slicing a dynamic-shaped view makes torch.export emit min() guards it then rejects
    xr, rest = x.split([rd, d - rd], -1) if rd < d else (x, None)
    x1, x2 = xr.split([rd // 2, rd // 2], -1)
    out = xr * cos + torch.cat([x2, x1], -1) * sin
    return out if rest is None else torch.cat([out, rest], -1)


class Norm(torch.nn.Module):
    """The spec's RMSNorm or LayerNorm (weight + the spec's offset, bias optional) over ``dims``; a weight of
    more axes than one broadcasts over the last of ``x`` (per-head q/k norms: [heads, head_dim])."""

    def __init__(self, spec: DecoderSpec, wb: tuple[Any, Any], dims: tuple[int, ...] = (-1,),
                 shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        weight = np.asarray(wb[0], np.float32) + spec.norm_offset
        self.weight = param(weight.reshape(shape) if shape else weight)
        self.bias = None if wb[1] is None else param(np.asarray(wb[1]).reshape(shape) if shape else wb[1])
        self.layer_norm, self.eps, self.dims = spec.norm == "layer", spec.eps, dims

    def forward(self, x: Any) -> Any:
        if self.layer_norm and self.dims == (-1,) and self.weight.dim() == 1:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        if self.layer_norm:
            x = x - x.mean(self.dims, keepdim=True)
        y = x / torch.sqrt((x * x).mean(self.dims, keepdim=True) + self.eps) * self.weight
        return y + self.bias if self.bias is not None else y


def norm_or_none(spec: DecoderSpec, wb: Any) -> Norm | None:
    return None if wb is None else Norm(spec, wb)


def apply(norm: Norm | None, x: Any) -> Any:
    return x if norm is None else norm(x)


def qk_norm(spec: DecoderSpec, wb: Any, heads: int) -> Norm | None:
    """A q or k norm for [B, S, heads, head_dim]: over each head's channels, or over all of them
    (``spec.qk_norm == "full"``: OLMo 2's norm over the whole projection)."""
    if wb is None:
        return None
    if spec.qk_norm == "full":
        return Norm(spec, wb, dims=(-2, -1), shape=(heads, spec.head_dim))
    return Norm(spec, wb)


Linear = Callable[..., torch.nn.Module]  # (weight [out, in] or QuantizedTensor, bias=None) -> module


class Block(torch.nn.Module):
    """One decoder layer's weights and residual wiring; the backend's subclass adds the attention."""

    def __init__(self, spec: DecoderSpec, layer: Any, linear: Linear) -> None:
        super().__init__()
        self.norm1, self.norm2 = norm_or_none(spec, layer.norm1), norm_or_none(spec, layer.norm2)
        self.post1, self.post2 = norm_or_none(spec, layer.post_norm1), norm_or_none(spec, layer.post_norm2)
        self.q_norm, self.k_norm = qk_norm(spec, layer.q_norm, spec.heads), qk_norm(spec, layer.k_norm, spec.kv_heads)
        self.qkv = linear(concat(layer.qkv), None if layer.qkv_bias is None else np.concatenate(layer.qkv_bias))
        self.o = linear(layer.o, layer.o_bias)
        self.up = linear(concat(layer.up), layer.up_bias)
        self.down = linear(layer.down, layer.down_bias)
        self.inter = layer.up[0].shape[0]
        self.rotation = layer.down_rotation is not None
        if self.rotation:
            self.signs, self.block = param(layer.down_rotation[0]), param(layer.down_rotation[1])
        self.heads = (spec.heads, spec.kv_heads, spec.head_dim)
        # (a spec without rotary embeddings, learned positions instead, leaves the layers' default index 0)
        self.rope = layer.rope if layer.rope is not None and layer.rope < len(spec.ropes) else None
        self.rope_dim = spec.ropes[self.rope].dim if self.rope is not None else 0
        self.window = layer.window
        self.scale = float(spec.attn_scale) if spec.attn_scale is not None else float(spec.head_dim ** -0.5)
        self.softcap = spec.attn_softcap
        self.gated, self.act = spec.gated, spec.act
        self.residual_scale, self.parallel, self.post_ln = spec.residual_scale, spec.parallel, spec.post_ln

    def wire(self, x: Any, attend: Callable[[Any], Any]) -> Any:
        """The block's output; ``attend(h)`` is the attention after its output projection."""
        if self.post_ln:  # OPT's 350m form: the norms follow the residual adds
            x = apply(self.norm1, x + attend(x))
            return apply(self.norm2, x + self.mlp(x))
        h = apply(self.norm1, x)
        a = self.branch(attend(h), self.post1)
        if self.parallel:  # attention and MLP read the block input (norm2 None: they share norm1)
            h2 = h if self.norm2 is None else self.norm2(x)
            return x + (a + self.branch(self.mlp(h2), self.post2))
        x = x + a
        return x + self.branch(self.mlp(apply(self.norm2, x)), self.post2)

    def branch(self, y: Any, post: Norm | None) -> Any:
        """An attention or MLP output joining the residual stream: its post-norm, then the multiplier."""
        y = apply(post, y)
        return y * self.residual_scale if self.residual_scale != 1.0 else y

    def mlp(self, h: Any) -> Any:
        h = self.activate(self.up(h))
        if self.rotation:  # down_proj reads x R: signs, then the Hadamard block on each group of channels
            n = self.block.shape[0]
            shape = h.shape
            h = ((h * self.signs).reshape(shape[0], shape[1], -1, n) @ self.block).reshape(shape)
        return self.down(h)

    def activate(self, h: Any) -> Any:
        """The activation of the up projection (gated: of the gate half, times the up half)."""
        if self.gated:
            gate, up = h.split([self.inter, self.inter], -1)
            return activation(gate, self.act) * up
        return activation(h, self.act)

    def project(self, h: Any, ropes: dict[int, tuple[Any, Any]]) -> tuple[Any, Any, Any]:
        """q [B, S, heads, d], k and v [B, S, kv_heads, d]: the q/k norms, then the layer's rotary embedding
        (``ropes``: cos and signed sin by rope index, broadcastable to [B, S, 1, rotary dim])."""
        nh, kv, d = self.heads
        b, s = h.shape[0], h.shape[1]
        # heads first, then split: reshaping a split view makes torch.export emit a guard it rejects
        q, k, v = self.qkv(h).reshape(b, s, nh + 2 * kv, d).split([nh, kv, kv], 2)
        q, k = apply(self.q_norm, q), apply(self.k_norm, k)
        if self.rope is not None:
            cos, sin = ropes[self.rope]
            q, k = rotary(q, cos, sin, self.rope_dim, d), rotary(k, cos, sin, self.rope_dim, d)
        return q, k, v


class DecoderBase(torch.nn.Module):
    """The embedding, the rotary tables, the final norm and the LM head; the backend's subclass has the
    layers and ``forward``."""

    def __init__(self, spec: DecoderSpec, linear: Linear, max_len: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.embed = param(spec.embed)
        self.embed_scale = spec.embed_scale
        self.pos_embed = None if spec.pos_embed is None else param(spec.pos_embed)
        self.proj_in = self.proj_out = None
        if spec.embed_proj is not None:  # OPT-350m: the layers are wider than the embedding
            self.proj_in, self.proj_out = linear(spec.embed_proj[0]), linear(spec.embed_proj[1])
        self.n_ropes = len(spec.ropes)
        for j, rope in enumerate(spec.ropes):
            cos, sin = rope.tables(max_len)
            setattr(self, f"cos{j or ''}", param(cos))
            setattr(self, f"sin{j or ''}", param(sin))
        self.norm = norm_or_none(spec, spec.final_norm)
        self.head = linear(spec.lm_head if spec.lm_head is not None else spec.embed, spec.lm_head_bias)
        if spec.lm_head is None:
            self.head.weight = self.embed  # tied: one tensor in the program
        self.logit_scale, self.final_softcap = spec.logit_scale, spec.final_softcap

    def rope_tables(self) -> list[tuple[Any, Any]]:
        return [(getattr(self, f"cos{j or ''}"), getattr(self, f"sin{j or ''}")) for j in range(self.n_ropes)]

    def embed_tokens(self, tokens: Any) -> Any:
        """The tokens' embeddings, scaled and projected to the layers' width (positions are the caller's)."""
        x = F.embedding(tokens, self.embed)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        return x if self.proj_in is None else self.proj_in(x)

    def logits(self, x: Any) -> Any:
        x = apply(self.norm, x)
        if self.proj_out is not None:
            x = self.proj_out(x)
        y = self.head(x)
        if self.logit_scale != 1.0:
            y = y * self.logit_scale
        return softcap(y, self.final_softcap) if self.final_softcap else y
