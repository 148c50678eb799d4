"""How the TVM decoder's weights and operators reach the kernels: int4 codes packed the way the linear kernel
reads them, the custom ops the PyTorch decoder calls, and the converters that turn them into the kernels.

The PyTorch decoder calls the custom ops ``slm_export::tvm_linear`` / ``tvm_qlinear`` / ``tvm_attention``
/ ``tvm_silu_mul`` (``torch_ops``), which torch.export keeps as they are; ``convert_map`` turns them into
``call_tir`` of ``kernels.linear_kernel``, ``attention.attention_kernel`` and ``attention.silu_mul_kernel``
when Relax imports the program.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

from slm_export.backends.tvm.attention import attention_kernel, silu_mul_kernel
from slm_export.backends.tvm.kernels import linear_kernel


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """uint8 codes ``[out, in]`` (values < 16, ``in`` a multiple of 16) -> ``[out, in / 2]``: byte ``8b + p``
    holds column ``16b + p`` in its low nibble and column ``16b + 8 + p`` in its high nibble."""
    c = np.ascontiguousarray(codes, dtype=np.uint8)
    out, n = c.shape
    blocks = c.reshape(out, n // 16, 2, 8)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(out, n // 2).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """The inverse of ``pack_int4``: ``[out, in / 2]`` -> uint8 codes ``[out, in]``."""
    p = np.asarray(packed, np.uint8)
    out, half = p.shape
    blocks = p.reshape(out, half // 8, 1, 8)
    return np.concatenate([blocks & 15, blocks >> 4], 2).reshape(out, 2 * half)


def packs_int4(bits: int, in_features: int) -> bool:
    """Whether a ``bits``-wide weight with ``in_features`` columns is stored packed two codes a byte."""
    return bits == 4 and in_features % 16 == 0


@cache
def torch_ops() -> Any:
    """The custom ops the PyTorch decoder's linears call (registered once a process): ``tvm_linear(x,
    weight, bias)`` and ``tvm_qlinear(x, codes, scales, zeros, bias, group, zero, packed)``; their eager
    forms compute the same product in PyTorch."""
    import torch
    import torch.nn.functional as F

    lib = "slm_export::"

    @torch.library.custom_op(lib + "tvm_linear", mutates_args=(), schema="(Tensor x, Tensor weight, Tensor? bias) "
                                                                         "-> Tensor")
    def tvm_linear(x: Any, weight: Any, bias: Any) -> Any:
        return F.linear(x, weight, bias)

    @tvm_linear.register_fake
    def _(x: Any, weight: Any, bias: Any) -> Any:
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.custom_op(lib + "tvm_qlinear", mutates_args=(), schema=(
        "(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor? bias, int group, float zero, bool packed) "
        "-> Tensor"))
    def tvm_qlinear(x: Any, codes: Any, scales: Any, zeros: Any, bias: Any, group: int, zero: float,
                    packed: bool) -> Any:
        c = torch.from_numpy(unpack_int4(codes.numpy())) if packed else codes
        out_f, in_f = c.shape
        w = c.reshape(out_f, in_f // group, group).to(torch.float32)
        z = zero if zeros is None else zeros.to(torch.float32)[:, :, None]
        return F.linear(x, ((w - z) * scales[:, :, None]).reshape(out_f, in_f), bias)

    @tvm_qlinear.register_fake
    def _(x: Any, codes: Any, scales: Any, zeros: Any, bias: Any, group: int, zero: float, packed: bool) -> Any:
        return x.new_empty((*x.shape[:-1], codes.shape[0]))

    # scale 0: head_dim ** -0.5; softcap 0: none (else scores become softcap * tanh(scores / softcap))
    @torch.library.custom_op(lib + "tvm_attention", mutates_args=(), schema="(Tensor q, Tensor k, Tensor v, "
                             "Tensor mask, float scale=0.0, float softcap=0.0) -> Tensor")
    def tvm_attention(q: Any, k: Any, v: Any, mask: Any, scale: float = 0.0, softcap: float = 0.0) -> Any:
        b, heads, s, d = q.shape
        kv = k.shape[1]
        qg = (q * (scale or d ** -0.5)).reshape(b, kv, heads // kv, s, d)
        scores = qg @ k.transpose(2, 3)[:, :, None]
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        ctx = torch.softmax(scores + mask[:, :, None], -1) @ v[:, :, None]  # [b, kv, rep, s, d]
        return ctx.permute(0, 3, 1, 2, 4).reshape(b, s, heads * d)

    @tvm_attention.register_fake
    def _(q: Any, k: Any, v: Any, mask: Any, scale: float = 0.0, softcap: float = 0.0) -> Any:
        return q.new_empty((q.shape[0], q.shape[2], q.shape[1] * q.shape[3]))

    @torch.library.custom_op(lib + "tvm_silu_mul", mutates_args=(), schema="(Tensor h) -> Tensor")
    def tvm_silu_mul(h: Any) -> Any:
        gate, up = h.chunk(2, -1)
        return gate * torch.sigmoid(gate) * up

    @tvm_silu_mul.register_fake
    def _(h: Any) -> Any:
        return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))

    return torch.ops.slm_export


def convert_map() -> dict[str, Any]:
    """``custom_convert_map`` for ``from_exported_program``: the ``torch_ops`` as ``call_tir`` of the kernels
    (one PrimFunc per distinct shape and variant, shared by the layers)."""
    conv = _Converters()
    return {"tvm_linear.default": conv.linear, "tvm_qlinear.default": conv.qlinear,
            "tvm_attention.default": conv.attention, "tvm_silu_mul.default": conv.silu_mul}


def _rows3(bb: Any, x: Any) -> tuple[Any, list[Any]]:
    """``x`` as ``[batch, seq, features]`` (the kernels' input; a reshape only for another rank)."""
    from tvm import relax

    shape = list(x.ty.shape.values)
    if len(shape) == 3:
        return x, shape
    rows = shape[0]
    for d in shape[1:-1]:
        rows = rows * d
    return bb.emit(relax.op.reshape(x, [1, rows, shape[-1]])), shape


def _call(bb: Any, func: Any, x: Any, args: list[Any], width: int) -> Any:
    """``call_tir`` of a ``[batch, seq, features]`` kernel on ``x`` of any rank, ``width`` output features."""
    from tvm import relax

    x3, shape = _rows3(bb, x)
    lead = list(x3.ty.shape.values)[:-1]
    out = bb.emit(relax.call_tir(func, [x3, *args], relax.TensorType([*lead, width], "float32")))
    return out if len(shape) == 3 else bb.emit(relax.op.reshape(out, [*shape[:-1], width]))


class _Converters:
    """The converters of one import; they share its PrimFuncs (one per distinct shape and variant)."""

    def __init__(self) -> None:
        self.funcs: dict[tuple[Any, ...], Any] = {}

    def _emit(self, importer: Any, x: Any, weight: Any, extra: list[Any], key: tuple[Any, ...]) -> Any:
        bb = importer.block_builder
        n = int(weight.ty.shape.values[0])
        if key not in self.funcs:
            self.funcs[key] = bb.add_func(linear_kernel(n, *key[1:]), f"slm_linear_{len(self.funcs)}")
        return _call(bb, self.funcs[key], x, [weight, *(weight if a is None else a for a in extra)], n)

    def linear(self, node: Any, importer: Any) -> Any:
        x, weight, bias = importer.retrieve_args(node)
        k = int(x.ty.shape.values[-1])
        return self._emit(importer, x, weight, [None, None, bias], (int(weight.ty.shape.values[0]), k, None, 0,
                                                                  None, bias is not None))

    def qlinear(self, node: Any, importer: Any) -> Any:
        x, codes, scales, zeros, bias, group, zero, packed = importer.retrieve_args(node)
        k = int(x.ty.shape.values[-1])
        key = (int(codes.ty.shape.values[0]), k, "int4" if packed else "byte", int(group),
               None if zeros is not None else float(zero), bias is not None)
        return self._emit(importer, x, codes, [scales, zeros, bias], key)

    def attention(self, node: Any, importer: Any) -> Any:
        from tvm import relax

        q, k, v, mask, *rest = importer.retrieve_args(node)
        scale, softcap = (float(a) for a in (*rest, 0.0, 0.0)[:2])
        b, heads, s, d = q.ty.shape.values
        key = (int(heads), int(k.ty.shape.values[1]), int(d), scale or None, softcap or None)
        if key not in self.funcs:
            self.funcs[key] = importer.block_builder.add_func(
                attention_kernel(*key[:3], scale=key[3], softcap=key[4]), f"slm_attention_{len(self.funcs)}")
        out = relax.TensorType([b, s, heads * d], "float32")
        return importer.block_builder.emit(relax.call_tir(self.funcs[key], [q, k, v, mask], out))

    def silu_mul(self, node: Any, importer: Any) -> Any:
        (h,) = importer.retrieve_args(node)
        bb = importer.block_builder
        inter = int(h.ty.shape.values[-1]) // 2
        key = ("silu", inter)
        if key not in self.funcs:
            self.funcs[key] = bb.add_func(silu_mul_kernel(inter), f"slm_silu_mul_{len(self.funcs)}")
        h3, _ = _rows3(bb, h)
        return _call(bb, self.funcs[key], h, [h3], inter)
