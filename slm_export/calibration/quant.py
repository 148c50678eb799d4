"""Weight quantization primitives shared by every method: the quantized tensor and round-to-nearest.

Weights are ``[out, in]`` (Hugging Face Linear layout); groups run along ``in``, the reduction axis,
which is what ONNX Runtime's MatMulNBits and ONNX's blocked DequantizeLinear expect.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slm_export.errors import CompileError, ConfigError

# Tensors larger than this many elements are rounded and measured in blocks of rows: a 128k-row LM head would
# otherwise make several full-size float32 temporaries at once.
CHUNK_ELEMS = 1 << 24


@dataclass(frozen=True)
class QuantizedTensor:
    """Integer codes with per-group scales: ``w[o, i] = (codes[o, i] - zero[o, i // g]) * scale[o, i // g]``.

    ``zeros`` is None for symmetric quantization (zero point ``2**(bits-1)``, codes stored offset). A
    symmetric int4 tensor made with signed scales (``group_params(signed=True)``) has negative scales in the
    groups whose positive end is the longer one; ``signed_scales`` says whether any group has one.
    """

    codes: np.ndarray  # uint8 [out, in], values in [0, 2**bits)
    scales: np.ndarray  # float32 [out, in // group]
    zeros: np.ndarray | None  # uint8 [out, in // group] or None (symmetric)
    bits: int
    group: int
    # W8A8: the input activations are int8 too, either with a static per-tensor scale from calibration
    # (``act_scale``) or per token at run time (``act_dynamic``). Both symmetric, zero point 0.
    act_scale: float | None = None
    act_dynamic: bool = False

    @property
    def activations(self) -> str:
        return "static" if self.act_scale is not None else "dynamic" if self.act_dynamic else "float"

    @property
    def per_tensor(self) -> bool:
        """One scale for the whole tensor (the FPGA's power-of-two scheme)."""
        return self.zeros is None and bool(np.all(self.scales == self.scales.flat[0]))

    @property
    def signed_scales(self) -> bool:
        return bool((self.scales < 0).any())

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape  # type: ignore[return-value]

    @property
    def size(self) -> int:
        return int(self.codes.size)

    def __getitem__(self, rows: slice | np.ndarray) -> QuantizedTensor:
        """Rows (output channels) of the tensor, a slice or an array of row indices: a fused q/k/v projection
        splits this way (GPT-NeoX's interleaves q, k and v per head, so its rows are gathered)."""
        if not isinstance(rows, slice | np.ndarray):
            raise TypeError("QuantizedTensor supports row slices and row index arrays only")
        zeros = None if self.zeros is None else self.zeros[rows]
        return QuantizedTensor(self.codes[rows], self.scales[rows], zeros, self.bits, self.group, self.act_scale,
                               self.act_dynamic)

    @property
    def zero_points(self) -> np.ndarray:
        if self.zeros is not None:
            return self.zeros
        return np.full(self.scales.shape, 1 << (self.bits - 1), np.uint8)

    def dequantize(self) -> np.ndarray:
        """Float32 ``[out, in]``."""
        z = np.repeat(self.zero_points.astype(np.float32), self.group, axis=1)
        s = np.repeat(self.scales, self.group, axis=1)
        return (self.codes.astype(np.float32) - z) * s

    def storage_bytes(self) -> int:
        """Bytes as stored for the runtime: packed codes, fp32 scales, packed zero points."""
        zeros = 0 if self.zeros is None else self.zeros.size * self.bits // 8
        return self.size * self.bits // 8 + self.scales.size * 4 + zeros

    def nibbles(self) -> np.ndarray | None:
        """The codes as held two to a byte (``PackedQuantized``), or None when they are held one to a byte."""
        return None

    @staticmethod
    def concat(parts: list[QuantizedTensor]) -> QuantizedTensor:
        """Stack along ``out`` (q, k and v become one MatMul)."""
        first = parts[0]
        if any(p.bits != first.bits or p.group != first.group or (p.zeros is None) != (first.zeros is None)
               or p.act_scale != first.act_scale or p.act_dynamic != first.act_dynamic for p in parts):
            raise ValueError("cannot merge projections quantized differently")
        zeros = None if first.zeros is None else np.concatenate([p.zeros for p in parts], 0)  # type: ignore[misc]
        return QuantizedTensor(np.concatenate([p.codes for p in parts], 0),
                               np.concatenate([p.scales for p in parts], 0), zeros, first.bits, first.group,
                               first.act_scale, first.act_dynamic)

    @staticmethod
    def joined(parts: list[QuantizedTensor]) -> QuantizedTensor:
        """``concat`` that stacks the arrays only when they are read (``JoinedQuantized``): the exporter holds a
        fused q/k/v or gate/up for every layer until the graph is written, so eager copies would double the
        model's codes in memory."""
        if len(parts) == 1:
            return parts[0]
        QuantizedTensor.concat([p[:1] for p in parts])  # the same checks, on one row of each
        return JoinedQuantized(parts)


class JoinedQuantized(QuantizedTensor):
    """Projections quantized alike, stacked along ``out`` each time an array is read, never stored stacked."""

    def __init__(self, parts: list[QuantizedTensor]) -> None:  # noqa: D107 (not the dataclass's fields)
        object.__setattr__(self, "_parts", tuple(parts))

    def _cat(self, field: str) -> np.ndarray:
        return np.concatenate([getattr(p, field) for p in self._parts], 0)

    codes = property(lambda self: self._cat("codes"))  # type: ignore[assignment]
    scales = property(lambda self: self._cat("scales"))  # type: ignore[assignment]
    zeros = property(lambda self: None if self._parts[0].zeros is None else self._cat("zeros"))  # type: ignore[assignment]
    bits = property(lambda self: self._parts[0].bits)  # type: ignore[assignment]
    group = property(lambda self: self._parts[0].group)  # type: ignore[assignment]
    act_scale = property(lambda self: self._parts[0].act_scale)  # type: ignore[assignment]
    act_dynamic = property(lambda self: self._parts[0].act_dynamic)  # type: ignore[assignment]

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(p.shape[0] for p in self._parts), self._parts[0].shape[1])

    @property
    def size(self) -> int:
        return sum(p.size for p in self._parts)

    def nibbles(self) -> np.ndarray | None:
        parts = [p.nibbles() for p in self._parts]
        return None if any(p is None for p in parts) else np.concatenate(parts, 0)  # type: ignore[arg-type]


class PackedQuantized(QuantizedTensor):
    """A tensor of at most 4 bits holding its codes two to a byte (low nibble first along ``in``: MatMulNBits'
    order), unpacked each time ``codes`` is read. A streamed model's compress results are held until the graph is
    written, and at a byte per code a 3B model's codes alone would take 3 GB."""

    def __init__(self, q: QuantizedTensor, nibbles: np.ndarray | None = None) -> None:  # noqa: D107
        if nibbles is None:
            codes = q.codes
            nibbles = np.ascontiguousarray(codes[:, 0::2] | (codes[:, 1::2] << 4))
        object.__setattr__(self, "_nibbles", nibbles)
        for name in ("scales", "zeros", "bits", "group", "act_scale", "act_dynamic"):
            object.__setattr__(self, name, getattr(q, name))

    @staticmethod
    def of(q: QuantizedTensor) -> QuantizedTensor:
        """``q`` packed where its codes fit a nibble and pair up along ``in``; ``q`` itself otherwise."""
        if type(q) is not QuantizedTensor or q.bits > 4 or q.shape[1] % 2:
            return q
        return PackedQuantized(q)

    @property  # type: ignore[override]
    def codes(self) -> np.ndarray:
        nib = self._nibbles
        out = np.empty((nib.shape[0], nib.shape[1] * 2), np.uint8)
        np.bitwise_and(nib, 15, out=out[:, 0::2])
        np.right_shift(nib, 4, out=out[:, 1::2])
        return out

    def nibbles(self) -> np.ndarray | None:
        return self._nibbles

    @property
    def shape(self) -> tuple[int, int]:
        return (self._nibbles.shape[0], self._nibbles.shape[1] * 2)

    @property
    def size(self) -> int:
        return int(self._nibbles.size * 2)

    def __getitem__(self, rows: slice | np.ndarray) -> QuantizedTensor:
        if not isinstance(rows, slice | np.ndarray):
            raise TypeError("QuantizedTensor supports row slices and row index arrays only")
        zeros = None if self.zeros is None else self.zeros[rows]
        part = QuantizedTensor(self._nibbles[:0], self.scales[rows], zeros, self.bits, self.group, self.act_scale,
                               self.act_dynamic)
        return PackedQuantized(part, self._nibbles[rows])


@dataclass(frozen=True)
class HotRowsTensor(QuantizedTensor):
    """An LM head in two precisions: every row at the base width (the inherited fields, e.g. int4), and the
    ``rows`` its calibration data reads most (``hot``, e.g. int8) again. The graph runs both and writes the
    hot logits over the base ones, so a token costs the int4 head plus a few percent.

    Only ONNX graphs take it (the exporter's head); a backend that reads the inherited int4 codes alone must
    refuse it (``refuse_hot_rows``), or it would compute a different model from the one validated."""

    rows: np.ndarray | None = None  # int64 [k], ascending: the vocabulary rows kept at ``hot``'s width
    hot: QuantizedTensor | None = None  # [k, in]

    def __post_init__(self) -> None:
        if self.rows is None or self.hot is None or self.hot.shape != (len(self.rows), self.codes.shape[1]):
            raise ValueError("hot rows need their indices and one quantized row for each")

    @property
    def base(self) -> QuantizedTensor:
        return QuantizedTensor(self.codes, self.scales, self.zeros, self.bits, self.group)

    def dequantize(self) -> np.ndarray:
        w = self.base.dequantize()
        w[self.rows] = self.hot.dequantize()  # type: ignore[union-attr]
        return w

    def storage_bytes(self) -> int:
        return self.base.storage_bytes() + self.hot.storage_bytes() + self.rows.size * 8  # type: ignore[union-attr]


def refuse_hot_rows(w: QuantizedTensor, backend: str) -> None:
    if isinstance(w, HotRowsTensor):
        raise CompileError(f"{backend} takes one width per LM head; this head keeps {len(w.rows)} rows at "  # type: ignore[arg-type]
                           f"int{w.hot.bits} over int{w.bits} (--lm-head-hot): build with --lm-head-hot 0")  # type: ignore[union-attr]


def refuse_signed_scales(w: QuantizedTensor, backend: str) -> None:
    if w.signed_scales:
        raise CompileError(f"{backend} takes positive weight scales; this tensor's int{w.bits} groups have negative "
                           "ones (signed scales, made for ONNX Runtime and TVM targets): quantize for this "
                           "target's own profile")


def check_group(in_features: int, group: int, name: str = "weight") -> None:
    """A group size must divide the reduction dimension; the message lists the sizes that would."""
    if group <= 0 or in_features % group:
        valid = [g for g in (16, 32, 64, 128, 256) if in_features % g == 0]
        raise ConfigError(f"group size {group} does not divide {name}'s input dimension {in_features}; "
                          f"valid group sizes here: {', '.join(map(str, valid)) or 'none of 16..256'}")


def group_params(w: torch.Tensor, bits: int, symmetric: bool, clip: torch.Tensor | float = 1.0,
                 pow2: bool = False, signed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of ``w`` ([rows, group]) -> ([rows, 1], [rows, 1]).

    ``signed`` (symmetric, below 8 bits): a group whose positive end is the longer one gets a negative
    scale, so that its extra level (code -half) reaches that end, as llama.cpp's Q4_0 does (its ``d = max /
    -8``). Only for runtimes that multiply by the scale as stored (ONNX Runtime's MatMulNBits and
    DequantizeLinear, the TVM kernels); ExecuTorch's XNNPACK GEMMs refuse it (``refuse_signed_scales``)."""
    qmax = (1 << bits) - 1
    if symmetric:
        half = (qmax + 1) // 2
        if bits < 8 and not pow2:
            # All 2**bits levels: codes run -half..half-1, so the negative end reaches one step further.
            # The smallest step that clips neither end, which is up to 1/8 finer than amax / 7 at int4.
            # int8 keeps -127..127, what TensorRT's Q/DQ expect.
            neg = (-w.amin(1, keepdim=True)).clamp_min(0) * clip
            pos = w.amax(1, keepdim=True).clamp_min(0) * clip
            scale = torch.maximum(neg / half, pos / (half - 1)).clamp_min(1e-8)
            if signed:
                flipped = torch.maximum(pos / half, neg / (half - 1)).clamp_min(1e-8)
                scale = torch.where(flipped < scale, -flipped, scale)
            return scale, torch.full_like(scale, half)
        amax = (w.abs().amax(1, keepdim=True) * clip).clamp_min(1e-8)
        scale = amax / (qmax // 2)
        if pow2:
            scale = torch.exp2(torch.ceil(torch.log2(scale)))
        zero = torch.full_like(scale, half)
        return scale, zero
    lo = (w.amin(1, keepdim=True) * clip).clamp(max=0)
    hi = (w.amax(1, keepdim=True) * clip).clamp(min=0)
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def search_group_clip(w: torch.Tensor, bits: int, symmetric: bool, grid: int = 40, max_shrink: float = 0.2,
                      norm: float = 2.4, importance: torch.Tensor | None = None,
                      signed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of ``w`` ([rows, group]) with the range shrunk by the factor (1 down to
    ``1 - max_shrink``) that minimises ``sum |w - q(w)|^norm`` of the row: the reference GPTQ's ``mse``
    option. Clipping a rare outlier buys a finer step for the rest of the group.

    ``importance`` ([rows, group], e.g. the Hessian's diagonal): each weight's error term is multiplied by
    it, so that with ``norm=2`` the sum estimates the error in the layer's output. smollm2-135m symmetric int4
    AWQ+GPTQ (64 x 512 calibration, float head, PyTorch): +6.45% perplexity with the plain |w - q(w)|^2.4,
    +4.57% with the Hessian-weighted square."""
    best_scale, best_zero = group_params(w, bits, symmetric, signed=signed)
    best_err = torch.full((w.shape[0], 1), float("inf"))
    qmax = (1 << bits) - 1
    for k in range(grid):
        clip = 1.0 - max_shrink * k / grid
        scale, zero = group_params(w, bits, symmetric, clip=clip, signed=signed)
        # quantize_codes, dequantize and the error in place: one temporary instead of six
        err = torch.div(w, scale).round_().add_(zero).clamp_(0, qmax).sub_(zero).mul_(scale).sub_(w)
        err = err.abs_().pow_(norm)
        if importance is not None:
            err.mul_(importance)
        err = err.sum(1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1)


def quantize_rtn(w: torch.Tensor | np.ndarray, bits: int, group: int, symmetric: bool,
                 pow2: bool = False, signed: bool = False) -> QuantizedTensor:
    """Round-to-nearest, per group along the input dimension (``group == in`` means per channel)."""
    w = torch.as_tensor(w, dtype=torch.float32)
    out_f, in_f = w.shape
    check_group(in_f, group)
    rows = max(1, CHUNK_ELEMS // in_f)
    if out_f > rows:  # each group is rounded on its own: blocks of rows give the same codes, fewer temporaries
        return QuantizedTensor.concat([quantize_rtn(w[i:i + rows], bits, group, symmetric, pow2, signed)
                                       for i in range(0, out_f, rows)])
    g = w.reshape(out_f * in_f // group, group)
    scale, zero = group_params(g, bits, symmetric, pow2=pow2, signed=signed)
    codes = quantize_codes(g, scale, zero, bits)
    shape = (out_f, in_f // group)
    return QuantizedTensor(codes.reshape(out_f, in_f).to(torch.uint8).numpy(),
                           scale.reshape(shape).numpy().astype(np.float32),
                           None if symmetric else zero.reshape(shape).to(torch.uint8).numpy(), bits, group)


def quantize_per_tensor(w: torch.Tensor | np.ndarray, bits: int = 8, pow2: bool = False) -> QuantizedTensor:
    """Symmetric, one scale for the whole tensor (rounded up to a power of two when ``pow2``)."""
    w = torch.as_tensor(w, dtype=torch.float32)
    out_f, in_f = w.shape
    scale, zero = group_params(w.reshape(1, -1), bits, True, pow2=pow2)
    codes = quantize_codes(w, scale, zero, bits)
    return QuantizedTensor(codes.to(torch.uint8).numpy(), np.full((out_f, 1), float(scale), np.float32), None,
                           bits, in_f)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    ref = reference.astype(np.float64)
    noise = ((ref - approx.astype(np.float64)) ** 2).sum()
    return float(10 * np.log10((ref ** 2).sum() / max(noise, 1e-30)))
