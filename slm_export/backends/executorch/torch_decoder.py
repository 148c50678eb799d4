"""Decoder spec -> a PyTorch module with a static, in-place KV cache: the form ExecuTorch exports.

The same ``DecoderSpec`` the ONNX exporter reads (so every adapted architecture, and the compress
stage's quantized weights), built as ``forward(tokens[1, S], input_pos[1]) -> logits[1, S, vocab]``:
one method serves prefill (S tokens at position 0) and decode (1 token at ``input_pos``). The cache is
a pair of buffers per layer of ``max_len`` positions, written in place by ExecuTorch's
``llama::update_cache`` and read by ``llama::custom_sdpa`` (causal from ``input_pos``, grouped-query
heads without copies), the kernels ExecuTorch's own LLM runner uses. That kernel knows no sliding window and
no score soft-cap: layers with either read the cache through plain torch ops (``masked_attention``: the
scores of every cache position, the additive mask of the layer's window), which ExecuTorch lowers as well.
The block wiring, norms, rotary embedding, embedding and head are ``backends/torch_blocks.py``'s, shared with
the TVM rebuild.

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

from slm_export.backends.torch_blocks import Block, DecoderBase, softcap, unsupported_ropes
from slm_export.calibration.quant import QuantizedTensor, refuse_hot_rows, refuse_signed_scales
from slm_export.errors import CompileError
from slm_export.exporters.layers import MASK_VALUE
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


def build_torch_decoder(spec: DecoderSpec, max_len: int) -> Any:
    """The module (float32 activations, eval mode) for ``spec`` with a ``max_len``-position cache."""
    # its rotary tables are fixed when built: a rope that changes with the call's length is refused first
    check_fixed_tables(spec.ropes, max_len, "the ExecuTorch build")
    custom_ops()
    return Decoder(spec, max_len).eval()


def unsupported(spec: DecoderSpec, max_len: int) -> str | None:
    """What of ``spec`` this rebuild cannot build for ``max_len`` positions, in words; None when it builds all
    of it."""
    return unsupported_ropes(spec, max_len)


def vec(a: Any) -> Any:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


class Linear(torch.nn.Module):
    def __init__(self, w: Any, bias: Any = None) -> None:
        super().__init__()
        self.weight = _linear_weight(w)
        self.bias = None if bias is None else torch.nn.Parameter(vec(bias), requires_grad=False)

    def forward(self, x: Any) -> Any:
        return F.linear(x, self.weight, self.bias)


def masked_attention(q: Any, k_cache: Any, v_cache: Any, mask: Any, scale: float, cap: float | None) -> Any:
    """q [1, S, heads, d] against the whole cache [1, max_len, kv_heads, d] under the additive ``mask``
    [S, max_len]; the context [1, S, heads * d]. Query heads are grouped by their kv head, so the cache is
    read as it is, never repeated."""
    _, s, nh, d = q.shape
    kv = k_cache.shape[2]
    # [1, S, kv, rep, d] -> [1, kv, rep, S, d]: views and one permute (a reshape after the transpose makes
    # torch.export emit a stride guard on the dynamic length that it then rejects)
    qg = (q * scale).reshape(1, s, kv, nh // kv, d).permute(0, 2, 3, 1, 4)
    scores = qg @ k_cache.permute(0, 2, 3, 1)[:, :, None]  # [1, kv, rep, S, max_len]
    if cap:
        scores = softcap(scores, cap)
    ctx = torch.softmax(scores + mask, -1) @ v_cache.transpose(1, 2)[:, :, None]  # [1, kv, rep, S, d]
    return ctx.permute(0, 3, 1, 2, 4).reshape(1, s, nh * d)


class Layer(Block):
    def __init__(self, spec: DecoderSpec, layer: Any, max_len: int) -> None:
        super().__init__(spec, layer, Linear)
        _, kv, d = self.heads
        self.register_buffer("k_cache", torch.zeros(1, max_len, kv, d))
        self.register_buffer("v_cache", torch.zeros(1, max_len, kv, d))
        if self.window is not None and self.window >= max_len:
            self.window = None  # a window over the whole cache hides nothing
        # custom_sdpa is causal from input_pos with no window or soft-cap: the fast path for the other layers
        self.masked = self.window is not None or bool(self.softcap)

    def forward(self, x: Any, pos: Any, ropes: dict[int, tuple[Any, Any]], masks: dict[Any, Any]) -> Any:
        return self.wire(x, lambda h: self.o(self.attention(h, pos, ropes, masks)))

    def attention(self, h: Any, pos: Any, ropes: dict[int, tuple[Any, Any]], masks: dict[Any, Any]) -> Any:
        """The new keys and values written into the cache at ``pos``, and the context [1, S, heads * d]."""
        nh, _, d = self.heads
        s = h.shape[1]
        q, k, v = self.project(h, ropes)
        torch.ops.llama.update_cache(k, self.k_cache, pos)
        torch.ops.llama.update_cache(v, self.v_cache, pos)
        if self.masked:
            return masked_attention(q, self.k_cache, self.v_cache, masks[self.window], self.scale, self.softcap)
        y = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, pos, None, 0.0, True, self.scale)
        return y.reshape(1, s, nh * d)


class Decoder(DecoderBase):
    def __init__(self, spec: DecoderSpec, max_len: int) -> None:
        super().__init__(spec, Linear, max_len)
        self.layers = torch.nn.ModuleList([Layer(spec, x, max_len) for x in spec.layers])
        self.mask_windows = sorted({layer.window for layer in self.layers if layer.masked},
                                   key=lambda w: -1 if w is None else w)

    def masks(self, input_pos: Any, s: Any) -> dict[Any, Any]:
        """For each window the masked layers use (None: none), the additive mask [S, max_len]: cache position
        j is visible to new token i when j <= input_pos + i and, with a window W, input_pos + i - j < W."""
        if not self.mask_windows:
            return {}
        distance = (input_pos + torch.arange(s))[:, None] - torch.arange(self.max_len)[None, :]
        out = {}
        for window in self.mask_windows:
            hidden = distance < 0
            if window is not None:
                hidden = hidden | (distance >= window)
            out[window] = hidden.to(torch.float32) * MASK_VALUE
        return out

    def forward(self, tokens: Any, input_pos: Any) -> Any:
        s = tokens.shape[1]
        pos = input_pos[0].item()
        torch._check(pos >= 0)
        torch._check(pos + s <= self.max_len)
        x = self.embed_tokens(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed.narrow(0, pos, s)[None]
        ropes = {j: (cos.narrow(0, pos, s)[None, :, None], sin.narrow(0, pos, s)[None, :, None])
                 for j, (cos, sin) in enumerate(self.rope_tables())}
        masks = self.masks(input_pos, s)
        for layer in self.layers:
            x = layer(x, pos, ropes, masks)
        return self.logits(x)
