"""Decoder spec -> the functional PyTorch decoder that the TVM build exports and imports into Relax.

The decoder is rebuilt from the same ``DecoderSpec`` the ONNX exporter reads, with the ONNX graph's
KV-cache interface (``build.py`` gives the signature): past keys and values come in, present ones go out.

Quantized linears (``QuantizedTensor``) stay quantized: int4 codes are stored packed two to a byte
(``uint8 [out, in / 2]`` in ``ops.pack_int4``'s blocks of 16 columns), other widths as
``uint8 [out, in]``, with float32 per-group scales and (asymmetric) uint8 zero points. Every linear (the
tied LM head included), the attention and the gated SiLU are custom ops (``ops.torch_ops``) that
the import turns into hand-written TIR kernels: they read the weights as stored (``[out, in]``, no
transposed or dequantized copy per call) and dequantize (``(code - zero) * scale``, the arithmetic of
``QuantizedTensor.dequantize``) inside the matmul. The attention kernel takes the spec's query scale and
score soft-cap; sliding windows are each layer's additive mask. The block wiring, norms, rotary embedding,
embedding and head are ``backends/torch_blocks.py``'s, shared with the ExecuTorch rebuild.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slm_export.backends.torch_blocks import Block, DecoderBase, param, unsupported_ropes
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


def unsupported(spec: DecoderSpec, max_len: int) -> str | None:
    """What of ``spec`` this rebuild cannot build for ``max_len`` positions, in words; None when it builds all
    of it."""
    return unsupported_ropes(spec, max_len)


def additive_mask(attention_mask: Any, b: Any, s: Any, p: Any, window: int | None = None) -> Any:
    """[B, 1, S, P + S]: key j is visible to new token i when j <= p + i, j is not padding (the past never
    is) and, with a window W, p + i - j < W."""
    key = torch.arange(p + s, dtype=torch.int64)
    distance = (torch.arange(s, dtype=torch.int64) + p)[:, None] - key[None, :]
    keep = torch.cat([torch.ones(b, p, dtype=torch.int64), attention_mask], 1) > 0
    # additive masks summed rather than one boolean And, which the Relax CPU pipeline does not lower
    mask = (torch.where(distance >= 0, 0.0, MASK_VALUE)[None, None]
            + torch.where(keep, 0.0, MASK_VALUE)[:, None, None, :])
    if window is not None:
        mask = mask + torch.where(distance < window, 0.0, MASK_VALUE)[None, None]
    return mask.to(torch.float32)


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


class Layer(Block):
    def __init__(self, spec: DecoderSpec, layer: Any) -> None:
        super().__init__(spec, layer, Linear)

    def forward(self, x: Any, masks: dict[Any, Any], ropes: dict[int, Any], past_k: Any,
                past_v: Any) -> tuple[Any, Any, Any]:
        present: list[Any] = []

        def attend(h: Any) -> Any:
            ctx, k_all, v_all = self.attention(h, masks[self.window], ropes, past_k, past_v)
            present.extend([k_all, v_all])
            return self.o(ctx)

        x = self.wire(x, attend)
        return x, present[0], present[1]

    def attention(self, h: Any, mask: Any, ropes: dict[int, Any], past_k: Any, past_v: Any) -> tuple[Any, Any, Any]:
        """The context [B, S, heads * d] and the present keys and values."""
        q, k, v = (t.transpose(1, 2) for t in self.project(h, ropes))
        k_all, v_all = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        # grouped-query attention in one kernel (attention.attention_kernel): the cache is read as it is,
        # never repeated per query head; the context comes back as [B, S, heads * d]
        ctx = torch_ops().tvm_attention(q, k_all, v_all, mask, self.scale, float(self.softcap or 0.0))
        return ctx, k_all, v_all

    def activate(self, h: Any) -> Any:
        if self.gated and self.act == "silu":  # one kernel, exp in vector lanes (attention.silu_mul_kernel)
            return torch_ops().tvm_silu_mul(h)
        return super().activate(h)


class Decoder(DecoderBase):
    def __init__(self, spec: DecoderSpec, max_len: int) -> None:
        super().__init__(spec, Linear, max_len)
        self.layers = torch.nn.ModuleList([Layer(spec, x) for x in spec.layers])
        self.mask_windows = sorted({layer.window for layer in spec.layers}, key=lambda w: -1 if w is None else w)

    def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, past: list[Any]) -> tuple[Any, ...]:
        b, s = input_ids.shape
        p = past[0].shape[2]
        x = self.embed_tokens(input_ids)
        if self.pos_embed is not None:
            x = x + F.embedding(position_ids, self.pos_embed)
        ropes = {j: (F.embedding(position_ids, cos)[:, :, None], F.embedding(position_ids, sin)[:, :, None])
                 for j, (cos, sin) in enumerate(self.rope_tables())}
        masks = {w: additive_mask(attention_mask, b, s, p, w) for w in self.mask_windows}
        presents: list[Any] = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, masks, ropes, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        return (self.logits(x), *presents)
