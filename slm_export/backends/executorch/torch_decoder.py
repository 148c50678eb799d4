"""Decoder spec -> a PyTorch module with a static, in-place KV cache: the form ExecuTorch exports.

The same ``DecoderSpec`` the ONNX exporter reads (so every adapted architecture, and the compress
stage's quantized weights), built as ``forward(tokens[1, S], input_pos[1]) -> logits[1, S, vocab]``:
one method serves prefill (S tokens at position 0) and decode (1 token at ``input_pos``). The cache is
a pair of buffers per layer of ``max_len`` positions, written in place by ExecuTorch's
``llama::update_cache`` and read by ``llama::custom_sdpa`` (causal from ``input_pos``, grouped-query
heads without copies), the kernels ExecuTorch's own LLM runner uses.

Quantized linear weights (``QuantizedTensor``: int4 or int8 codes, per-group scales) become torchao
``IntxUnpackedToInt8Tensor`` weights with per-token int8 dynamic activations, the pattern the XNNPACK
partitioner lowers to its int8 x int4/int8 GEMMs; the codes and scales are the compress stage's, not
re-rounded. Float weights stay float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slm_export.calibration.quant import QuantizedTensor, refuse_hot_rows, refuse_signed_scales
from slm_export.errors import CompileError
from slm_export.models.adapters import DecoderSpec
from slm_export.models.rope import check_fixed_tables


def custom_ops() -> None:
    """Register ExecuTorch's LLM operators (llama::update_cache, llama::custom_sdpa) with torch."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401


def _linear_weight(w: np.ndarray | QuantizedTensor) -> Any:
    if not isinstance(w, QuantizedTensor):
        return torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)), requires_grad=False)
    refuse_hot_rows(w, "ExecuTorch")
    refuse_signed_scales(w, "ExecuTorch")
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    if w.bits not in (4, 8):
        raise CompileError(f"ExecuTorch's XNNPACK GEMMs take int4 or int8 weights, not int{w.bits}")
    if w.zeros is not None:  # measured: XNNPACK's int4 GEMM ignores zero points (logits off by whole units)
        raise CompileError("ExecuTorch's XNNPACK GEMMs take symmetric weights (zero point 0); this tensor has "
                           "zero points: quantize with --symmetric")
    offset = 1 << (w.bits - 1)
    qdata = torch.from_numpy(w.codes.astype(np.int16) - offset).to(torch.int8)
    t = IntxUnpackedToInt8Tensor(
        qdata, torch.from_numpy(np.ascontiguousarray(w.scales, dtype=np.float32)),
        torch.zeros(w.scales.shape, dtype=torch.int8), torch.int4 if w.bits == 4 else torch.int8, (1, w.group),
        torch.float32, IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN)
    return torch.nn.Parameter(t, requires_grad=False)


def _concat(ws: tuple[Any, ...]) -> Any:
    if len(ws) == 1:
        return ws[0]
    if isinstance(ws[0], QuantizedTensor):
        return QuantizedTensor.concat(list(ws))
    return np.concatenate(ws, 0)


def build_torch_decoder(spec: DecoderSpec, max_len: int) -> Any:
    """The module (float32 activations, eval mode) for ``spec`` with a ``max_len``-position cache."""
    # its rotary tables are fixed when built: a rope that changes with the call's length is refused first
    check_fixed_tables(spec.ropes, max_len, "the ExecuTorch build")
    custom_ops()
    return Decoder(spec, max_len).eval()


def vec(a: Any) -> Any:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def activation(x: Any, act: str) -> Any:
    if act == "silu":
        return F.silu(x)
    if act == "relu":
        return F.relu(x)
    return F.gelu(x, approximate="tanh" if act == "gelu_tanh" else "none")


def rotary(x: Any, cos: Any, sin: Any, rd: int, d: int) -> Any:  # x [1, S, H, d]; cos/sin [S, rd] (sin signed)
    xr, rest = x[..., :rd], x[..., rd:]
    swapped = torch.cat([xr[..., rd // 2:], xr[..., : rd // 2]], -1)
    out = xr * cos[None, :, None, :] + swapped * sin[None, :, None, :]
    return torch.cat([out, rest], -1) if rd < d else out


class Linear(torch.nn.Module):
    def __init__(self, w: Any, bias: Any = None) -> None:
        super().__init__()
        self.weight = _linear_weight(w)
        self.bias = None if bias is None else torch.nn.Parameter(vec(bias), requires_grad=False)

    def forward(self, x: Any) -> Any:
        return F.linear(x, self.weight, self.bias)


class Norm(torch.nn.Module):
    def __init__(self, spec: DecoderSpec, weight: Any, bias: Any) -> None:
        super().__init__()
        self.register_buffer("weight", vec(np.asarray(weight, np.float32) + spec.norm_offset))
        self.register_buffer("bias", vec(bias) if bias is not None else None)
        self.layer_norm, self.eps = spec.norm == "layer", spec.eps

    def forward(self, x: Any) -> Any:
        if self.layer_norm:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps) * self.weight


class Layer(torch.nn.Module):
    def __init__(self, spec: DecoderSpec, layer: Any, max_len: int) -> None:
        super().__init__()
        kv, d = spec.kv_heads, spec.head_dim
        self.norm1, self.norm2 = Norm(spec, *layer.norm1), Norm(spec, *layer.norm2)
        self.qkv = Linear(_concat(layer.qkv), None if layer.qkv_bias is None else np.concatenate(layer.qkv_bias))
        self.o = Linear(layer.o, layer.o_bias)
        self.up = Linear(_concat(layer.up), layer.up_bias)
        self.down = Linear(layer.down, layer.down_bias)
        self.inter = layer.up[0].shape[0]
        self.rotation = layer.down_rotation
        if self.rotation is not None:
            self.register_buffer("signs", vec(self.rotation[0]))
            self.register_buffer("block", vec(self.rotation[1]))
        self.register_buffer("k_cache", torch.zeros(1, max_len, kv, d))
        self.register_buffer("v_cache", torch.zeros(1, max_len, kv, d))
        self.heads = (spec.heads, kv, d, spec.rotary_dim)
        self.gated, self.act = spec.gated, spec.act

    def forward(self, x: Any, pos: Any, cos: Any, sin: Any) -> Any:
        s = x.shape[1]
        x = x + self.o(self.attention(self.norm1(x), pos, cos, sin, s))
        h = self.up(self.norm2(x))
        if self.gated:
            gate, up = h.split([self.inter, self.inter], -1)
            h = activation(gate, self.act) * up
        else:
            h = activation(h, self.act)
        if self.rotation is not None:
            n = self.block.shape[0]
            h = ((h * self.signs).view(1, s, -1, n) @ self.block).view(1, s, -1)
        return x + self.down(h)

    def attention(self, h: Any, pos: Any, cos: Any, sin: Any, s: Any) -> Any:
        """The new keys and values written into the cache at ``pos``, and the context [1, S, heads * d]."""
        nh, kv, d, rd = self.heads
        q, k, v = self.qkv(h).split([nh * d, kv * d, kv * d], -1)
        q, k, v = q.view(1, s, nh, d), k.view(1, s, kv, d), v.view(1, s, kv, d)
        if cos is not None:
            q, k = rotary(q, cos, sin, rd, d), rotary(k, cos, sin, rd, d)
        torch.ops.llama.update_cache(k, self.k_cache, pos)
        torch.ops.llama.update_cache(v, self.v_cache, pos)
        y = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, pos, None, 0.0, True, d ** -0.5)
        return y.reshape(1, s, nh * d)


class Decoder(torch.nn.Module):
    def __init__(self, spec: DecoderSpec, max_len: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.embed = torch.nn.Parameter(vec(spec.embed), requires_grad=False)
        self.register_buffer("pos_embed", vec(spec.pos_embed) if spec.pos_embed is not None else None)
        if spec.rope_theta is not None:
            cos, sin = spec.ropes[0].tables(max_len)
            self.register_buffer("cos", vec(cos))
            self.register_buffer("sin", vec(sin))
        else:
            self.cos = self.sin = None
        self.layers = torch.nn.ModuleList([Layer(spec, x, max_len) for x in spec.layers])
        self.norm = Norm(spec, *spec.final_norm)
        self.head = Linear(spec.lm_head if spec.lm_head is not None else spec.embed)
        if spec.lm_head is None:
            self.head.weight = self.embed  # tied: one tensor in the program
        self.embed_scale = spec.embed_scale

    def forward(self, tokens: Any, input_pos: Any) -> Any:
        s = tokens.shape[1]
        pos = input_pos[0].item()
        torch._check(pos >= 0)
        torch._check(pos + s <= self.max_len)
        x = F.embedding(tokens, self.embed)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        if self.pos_embed is not None:
            x = x + self.pos_embed.narrow(0, pos, s)[None]
        cos = self.cos.narrow(0, pos, s) if self.cos is not None else None
        sin = self.sin.narrow(0, pos, s) if self.sin is not None else None
        for layer in self.layers:
            x = layer(x, pos, cos, sin)
        return self.head(self.norm(x))
