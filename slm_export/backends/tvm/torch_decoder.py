"""Decoder spec -> the functional PyTorch decoder that the TVM build exports and imports into Relax.

The decoder is rebuilt from the same ``DecoderSpec`` the ONNX exporter reads, with the ONNX graph's
KV-cache interface (``build.py`` gives the signature): past keys and values come in, present ones go out.

Quantized linears (``QuantizedTensor``) stay quantized: int4 codes are stored packed two to a byte
(``uint8 [out, in / 2]`` in ``ops.pack_int4``'s blocks of 16 columns), other widths as
``uint8 [out, in]``, with float32 per-group scales and (asymmetric) uint8 zero points. Every linear (the
tied LM head included), the attention and the gated SiLU are custom ops (``ops.torch_ops``) that
the import turns into hand-written TIR kernels: they read the weights as stored (``[out, in]``, no
transposed or dequantized copy per call) and dequantize (``(code - zero) * scale``, the arithmetic of
``QuantizedTensor.dequantize``) inside the matmul.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slm_export.backends.tvm.ops import pack_int4, packs_int4, torch_ops
from slm_export.calibration.quant import QuantizedTensor, refuse_hot_rows
from slm_export.errors import CompileError
from slm_export.exporters.layers import MASK_VALUE
from slm_export.models.adapters import DecoderSpec
from slm_export.models.rope import check_fixed_tables


def build_functional_decoder(spec: DecoderSpec, max_len: int) -> Any:
    """The PyTorch module (float32 activations, eval mode) with explicit KV-cache inputs and outputs.

    Every weight is an ``nn.Parameter`` (integer codes included), so the TVM importer keeps them all as
    function inputs; the tiny constants (the symmetric zero point) are Python numbers.
    """
    # its rotary tables are fixed when built: a rope that changes with the call's length is refused first
    check_fixed_tables(spec.ropes, max_len, "the TVM build")
    torch_ops()  # (registers the custom ops the modules call)
    return Decoder(spec, max_len).eval()


def param(a: Any, dtype: Any = np.float32) -> Any:
    return torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)), requires_grad=False)


def concat(ws: tuple[Any, ...]) -> Any:
    """Projections of one input (q/k/v, gate/up) as one weight."""
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


def rotary(x: Any, cos: Any, sin: Any, rd: int, d: int) -> Any:  # x [B, H, S, d]; cos/sin [B, 1, S, rd] (sin signed)
    # split, not slices: slicing a dynamic-shaped view makes torch.export emit min() guards it then rejects
    xr, rest = x.split([rd, d - rd], -1) if rd < d else (x, None)
    x1, x2 = xr.split([rd // 2, rd // 2], -1)
    out = xr * cos + torch.cat([x2, x1], -1) * sin
    return out if rest is None else torch.cat([out, rest], -1)


def additive_mask(attention_mask: Any, b: Any, s: Any, p: Any) -> Any:
    """[B, 1, S, P + S]: key j is visible to new token i when j <= p + i and j is not padding (the past
    never is)."""
    key = torch.arange(p + s, dtype=torch.int64)
    causal = key[None, :] <= (torch.arange(s, dtype=torch.int64) + p)[:, None]
    keep = torch.cat([torch.ones(b, p, dtype=torch.int64), attention_mask], 1) > 0
    # two additive masks rather than one boolean And, which the Relax CPU pipeline does not lower
    return (torch.where(causal, 0.0, MASK_VALUE)[None, None]
            + torch.where(keep, 0.0, MASK_VALUE)[:, None, None, :]).to(torch.float32)


class Linear(torch.nn.Module):
    """A linear through ``ops``' custom ops: the weight stays ``[out, in]`` as stored."""

    def __init__(self, w: Any, bias: Any = None) -> None:
        super().__init__()
        self.quantized = isinstance(w, QuantizedTensor)
        if self.quantized:
            refuse_hot_rows(w, "TVM")
            if w.activations != "float":
                raise CompileError("the TVM build takes weight-only quantization; int8 activations (W8A8) "
                                   "are not part of it in this version")
            self.group, self.packed = w.group, packs_int4(w.bits, w.shape[1])
            self.codes = param(pack_int4(w.codes) if self.packed else w.codes, np.uint8)
            self.scales = param(w.scales)
            # symmetric: one zero point for all groups, a constant of the kernel
            self.zero = float(1 << (w.bits - 1)) if w.zeros is None else 0.0
            self.zeros = None if w.zeros is None else param(w.zeros, np.uint8)
        else:
            self.weight = param(w)
        self.bias = None if bias is None else param(bias)

    def forward(self, x: Any) -> Any:
        if self.quantized:
            return torch_ops().tvm_qlinear(x, self.codes, self.scales, self.zeros, self.bias, self.group, self.zero,
                                           self.packed)
        return torch_ops().tvm_linear(x, self.weight, self.bias)


class Norm(torch.nn.Module):
    def __init__(self, spec: DecoderSpec, weight: Any, bias: Any) -> None:
        super().__init__()
        self.weight = param(np.asarray(weight, np.float32) + spec.norm_offset)
        self.bias = None if bias is None else param(bias)
        self.layer_norm, self.eps = spec.norm == "layer", spec.eps

    def forward(self, x: Any) -> Any:
        if self.layer_norm:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps) * self.weight


class Layer(torch.nn.Module):
    def __init__(self, spec: DecoderSpec, layer: Any) -> None:
        super().__init__()
        self.norm1, self.norm2 = Norm(spec, *layer.norm1), Norm(spec, *layer.norm2)
        self.qkv = Linear(concat(layer.qkv), None if layer.qkv_bias is None else np.concatenate(layer.qkv_bias))
        self.o = Linear(layer.o, layer.o_bias)
        self.up = Linear(concat(layer.up), layer.up_bias)
        self.down = Linear(layer.down, layer.down_bias)
        self.inter = layer.up[0].shape[0]
        self.rotation = layer.down_rotation is not None
        if self.rotation:
            self.signs, self.block = param(layer.down_rotation[0]), param(layer.down_rotation[1])
        self.heads = (spec.heads, spec.kv_heads, spec.head_dim, spec.rotary_dim)
        self.gated, self.act = spec.gated, spec.act

    def forward(self, x: Any, mask: Any, rope: Any, past_k: Any, past_v: Any) -> tuple[Any, Any, Any]:
        b, s = x.shape[0], x.shape[1]
        ctx, k_all, v_all = self.attention(self.norm1(x), mask, rope, past_k, past_v, b, s)
        x = x + self.o(ctx)
        h = self.mlp(self.up(self.norm2(x)))
        if self.rotation:
            n = self.block.shape[0]
            h = ((h * self.signs).reshape(b, s, -1, n) @ self.block).reshape(b, s, -1)
        return x + self.down(h), k_all, v_all

    def attention(self, h: Any, mask: Any, rope: Any, past_k: Any, past_v: Any, b: Any,
                  s: Any) -> tuple[Any, Any, Any]:
        """The context [B, S, heads * d] and the present keys and values."""
        nh, kv, d, rd = self.heads
        # heads first, then split: reshaping a split view makes torch.export emit a guard it rejects
        qkv = self.qkv(h).reshape(b, s, nh + 2 * kv, d).transpose(1, 2)
        q, k, v = qkv.split([nh, kv, kv], 1)
        if rope is not None:
            q, k = rotary(q, *rope, rd, d), rotary(k, *rope, rd, d)
        k_all, v_all = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        # grouped-query attention in one kernel (attention.attention_kernel): the cache is read as it is,
        # never repeated per query head; the context comes back as [B, S, heads * d]
        return torch_ops().tvm_attention(q, k_all, v_all, mask), k_all, v_all

    def mlp(self, h: Any) -> Any:
        """The activation of the up projection (gated: of the gate, times the up half)."""
        if self.gated and self.act == "silu":  # one kernel, exp in vector lanes (attention.silu_mul_kernel)
            return torch_ops().tvm_silu_mul(h)
        if self.gated:
            gate, up = h.split([self.inter, self.inter], -1)
            return activation(gate, self.act) * up
        return activation(h, self.act)


class Decoder(torch.nn.Module):
    def __init__(self, spec: DecoderSpec, max_len: int) -> None:
        super().__init__()
        self.embed = param(spec.embed)
        self.pos_embed = None if spec.pos_embed is None else param(spec.pos_embed)
        self.cos = self.sin = None
        if spec.rope_theta is not None:
            cos, sin = spec.ropes[0].tables(max_len)
            self.cos, self.sin = param(cos), param(sin)
        self.layers = torch.nn.ModuleList([Layer(spec, x) for x in spec.layers])
        self.norm = Norm(spec, *spec.final_norm)
        self.head = None if spec.lm_head is None else Linear(spec.lm_head)
        self.embed_scale = spec.embed_scale

    def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, past: list[Any]) -> tuple[Any, ...]:
        b, s = input_ids.shape
        p = past[0].shape[2]
        x = F.embedding(input_ids, self.embed)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        if self.pos_embed is not None:
            x = x + F.embedding(position_ids, self.pos_embed)
        rope = None
        if self.cos is not None:
            rope = (F.embedding(position_ids, self.cos)[:, None], F.embedding(position_ids, self.sin)[:, None])
        mask = additive_mask(attention_mask, b, s, p)
        presents: list[Any] = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, mask, rope, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        x = self.norm(x)
        # tied: the embedding table
        logits = torch_ops().tvm_linear(x, self.embed, None) if self.head is None else self.head(x)
        return (logits, *presents)
