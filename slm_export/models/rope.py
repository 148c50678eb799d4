"""Rotary position embeddings as a model fact: the base, the rotated width and the scaling a config asks for.

Every builder (the ONNX graphs, the ExecuTorch and TVM rebuilds) gets its cos/sin tables from
``Rope.tables``, so one computation serves them all and matches transformers' own
(``modeling_rope_utils``): the same float32 steps in the same order, and its ``attention_scaling``
multiplied into cos and sin.

Two kinds depend on the length of the call, which transformers reads as ``max(position_ids) + 1``
(``dynamic_rope_update``): ``dynamic`` recomputes the base from that length once it passes
``max_position_embeddings``, and ``longrope`` switches from the short to the long factors once it passes
``original_max_position_embeddings``. ``switch_len`` is that boundary; the ONNX graphs follow it in-graph,
and builders with fixed tables refuse a model whose context reaches past it (``check_fixed_tables``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from slm_export.errors import ConfigError

F32 = np.float32
# The rope types the tables implement; any other is refused when the model is adapted (exit 2).
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
# The parameters each kind reads that have no default (transformers' required keys).
REQUIRED = {
    "linear": ("factor",), "dynamic": ("factor", "max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}
NUMBERS = ("factor", "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast", "beta_slow",
           "mscale", "mscale_all_dim")
LENGTHS = ("original_max_position_embeddings", "max_position_embeddings")


@dataclass(frozen=True)
class Rope:
    theta: float
    dim: int  # the rotated channels of each head (partial rotary: fewer than head_dim)
    kind: str = "default"  # transformers' rope_type
    # the rest of rope_parameters (factor, original context, ...) and the config's max_position_embeddings
    params: tuple[tuple[str, Any], ...] = ()

    def param(self, name: str, default: Any = None) -> Any:
        value = dict(self.params).get(name)
        return default if value is None else value

    def exponents(self) -> np.ndarray:
        """arange(0, dim, 2) / dim in float32: the base's powers."""
        return np.arange(0, self.dim, 2, dtype=np.int64).astype(F32) / F32(self.dim)

    @property
    def switch_len(self) -> int | None:
        """The call length past which transformers changes the frequencies; None for kinds that do not."""
        if self.kind == "dynamic":
            return int(self.param("max_position_embeddings"))
        if self.kind == "longrope":
            return int(self.param("original_max_position_embeddings"))
        return None

    def length_dependent(self, max_len: int) -> bool:
        """Whether calls of up to ``max_len`` positions reach past ``switch_len``."""
        return self.switch_len is not None and max_len > self.switch_len

    @property
    def attention_scaling(self) -> float:
        """transformers' factor on cos and sin (yarn and longrope; 1 for the rest)."""
        if self.kind == "yarn":
            return _yarn_scaling(self)
        if self.kind == "longrope":
            given = self.param("attention_factor")
            if given is not None:
                return float(given)
            factor = self.param("factor")
            orig = self.param("original_max_position_embeddings")
            factor = factor if factor is not None else self.param("max_position_embeddings") / orig
            return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        return 1.0

    def inv_freq(self, seq_len: int | None = None) -> np.ndarray:
        """The inverse frequencies [dim/2], float32, for a call of ``seq_len`` positions (None: a call within
        ``switch_len``)."""
        powers = _pow32(F32(self.theta), self.exponents())
        if self.kind == "dynamic" and seq_len is not None and seq_len > self.switch_len:  # type: ignore[operator]
            return F32(1.0) / (self.dynamic_base(seq_len) ** self.exponents())
        if self.kind == "linear":
            return (F32(1.0) / powers) / F32(self.param("factor"))
        if self.kind == "yarn":
            return _yarn_inv_freq(self, powers)
        if self.kind == "llama3":
            return _llama3_inv_freq(self, F32(1.0) / powers)
        if self.kind == "longrope":
            long = seq_len is not None and seq_len > self.switch_len  # type: ignore[operator]
            ext = np.asarray(self.param("long_factor" if long else "short_factor"), dtype=F32)
            return F32(1.0) / (ext * powers)
        return F32(1.0) / powers

    def dynamic_base(self, seq_len: int) -> np.float32:
        """dynamic's base for a call of ``seq_len`` (> max_position_embeddings) positions, in float32 as
        transformers computes it from a tensor length."""
        factor, limit = self.param("factor"), self.param("max_position_embeddings")
        ratio = F32(factor) * F32(seq_len) / F32(limit) - F32(factor - 1)
        return F32(self.theta) * ratio ** F32(self.dim / (self.dim - 2))  # (torch: powf, a scalar exponent)

    def tables(self, max_pos: int, seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """cos and signed sin, [max_pos, dim], float32, computed the way transformers does for a call of
        ``seq_len`` positions (None: within ``switch_len``)."""
        freqs = np.arange(max_pos, dtype=F32)[:, None] * self.inv_freq(seq_len)[None, :]
        scale = self.attention_scaling
        cos, sin = _round32(np.cos, freqs) * F32(scale), _round32(np.sin, freqs) * F32(scale)
        return np.concatenate([cos, cos], -1), np.concatenate([-sin, sin], -1)


# float32 results of pow, cos and sin computed in float64 and rounded: nearer torch's float32 kernels than
# numpy's float32 ones (which differ from them by an ulp in about one value of six).
def _pow32(base: Any, exponent: Any) -> Any:
    return np.power(np.float64(base), np.asarray(exponent, dtype=np.float64)).astype(F32)


def _round32(fn: Any, x: np.ndarray) -> np.ndarray:
    return fn(x.astype(np.float64)).astype(F32)


def _yarn_scaling(rope: Rope) -> float:
    given = rope.param("attention_factor")
    if given is not None:
        return float(given)
    factor, mscale, mscale_all = _yarn_factor(rope), rope.param("mscale"), rope.param("mscale_all_dim")
    if mscale and mscale_all:
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all))
    return _yarn_mscale(factor)


def _yarn_mscale(scale: float, mscale: float = 1) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_factor(rope: Rope) -> float:
    factor = rope.param("factor")
    if factor is None:  # (DeepSeek-V3's configs: the ratio of the two context lengths)
        return rope.param("max_position_embeddings") / rope.param("original_max_position_embeddings")
    return factor


def _yarn_inv_freq(rope: Rope, powers: np.ndarray) -> np.ndarray:
    """YaRN: interpolated frequencies below the correction range, extrapolated above, a linear ramp between."""
    dim, base, orig = rope.dim, rope.theta, rope.param("original_max_position_embeddings")
    factor = _yarn_factor(rope)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    # (transformers reads ``beta_fast or 32``, ``beta_slow or 1`` and ``get("truncate", True)``: 0 and None too)
    low, high = correction_dim(rope.param("beta_fast") or 32), correction_dim(rope.param("beta_slow") or 1)
    if dict(rope.params).get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # (transformers' guard against a zero-width ramp)
    ramp = np.clip((np.arange(dim // 2, dtype=F32) - F32(low)) / F32(high - low), F32(0), F32(1))
    extrapolation = F32(1) - ramp
    return (F32(1.0) / (F32(factor) * powers)) * (F32(1) - extrapolation) + (F32(1.0) / powers) * extrapolation


def _llama3_inv_freq(rope: Rope, inv: np.ndarray) -> np.ndarray:
    """Llama 3.1: long wavelengths divided by ``factor``, short ones kept, a smooth blend between."""
    factor, low, high = (rope.param(k) for k in ("factor", "low_freq_factor", "high_freq_factor"))
    old = rope.param("original_max_position_embeddings")
    low_wavelen, high_wavelen = F32(old / low), F32(old / high)
    wavelen = F32(2 * math.pi) / inv
    scaled = np.where(wavelen > low_wavelen, inv / F32(factor), inv)
    smooth = (F32(old) / wavelen - F32(low)) / F32(high - low)
    smoothed = (F32(1) - smooth) * scaled / F32(factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(F32)


def check_rope(rope: Rope, where: str) -> None:
    """Refuse a rope whose parameters the formulas cannot use, naming the field (exit 2)."""
    for key in REQUIRED.get(rope.kind, ()):
        if rope.param(key) is None and not (key == "factor" and rope.kind == "yarn"):
            field = key if key == "max_position_embeddings" else f"rope_parameters.{key}"
            raise ConfigError(f"{where}: {field} is missing; rope_type {rope.kind!r} needs it")
    for key, value in rope.params:
        expected = _field_problem(key, value)
        if expected:
            field = key if key == "max_position_embeddings" else f"rope_parameters.{key}"
            raise ConfigError(f"{where}: {field} is {str(value)[:80]}; expected {expected}")
    if rope.kind == "llama3" and rope.param("high_freq_factor") <= rope.param("low_freq_factor"):
        raise ConfigError(f"{where}: rope_parameters.high_freq_factor ({rope.param('high_freq_factor')}) must be "
                          f"greater than low_freq_factor ({rope.param('low_freq_factor')})")
    if rope.kind == "dynamic" and rope.dim <= 2:
        raise ConfigError(f"{where}: rope_type 'dynamic' needs more than 2 rotated channels, not {rope.dim}")
    for key in ("short_factor", "long_factor") if rope.kind == "longrope" else ():
        value = rope.param(key)
        if not isinstance(value, list | tuple) or len(value) != rope.dim // 2 or not all(map(_number, value)):
            raise ConfigError(f"{where}: rope_parameters.{key} is {str(value)[:80]}; expected a list of "
                              f"{rope.dim // 2} numbers (one per rotated channel pair)")


def _field_problem(key: str, value: Any) -> str | None:
    """What a scalar field should be, when ``value`` is not that; None when it is (or is unset)."""
    if value is None:
        return None
    if key in NUMBERS and (not _number(value) or value < 0 or (key == "factor" and value == 0)):
        return "a positive number"
    if key in LENGTHS and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1):
        return "a positive integer"
    if key == "truncate" and not isinstance(value, bool):
        return "true or false"
    return None


def _number(value: Any) -> bool:
    # (numbers.Real: numpy scalars too, as a GGUF reader may give them)
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_fixed_tables(ropes: tuple[Rope, ...], max_len: int, builder: str) -> None:
    """Builders whose cos/sin tables are fixed when built cannot follow a rope that changes with the call's
    length; refuse one whose context (``max_len``) reaches past that change, before any work (exit 2)."""
    for rope in ropes:
        if rope.length_dependent(max_len):
            raise ConfigError(
                f"{builder} cannot build rope_type {rope.kind!r} for {max_len} positions: transformers changes its "
                f"frequencies once a call passes {rope.switch_len} positions, and this build's rotary tables are "
                f"fixed; use a target whose max_seq_len is {rope.switch_len} or less, or the ONNX artifact, "
                "which follows the change")
