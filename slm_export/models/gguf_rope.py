"""Llama 3's rope scaling recovered from a GGUF's ``rope_freqs`` tensor.

llama.cpp's converter does not write Llama 3.1's rope_scaling (rope_type llama3) as metadata: it computes one
divisor per rotated channel pair from the factor, low_freq_factor, high_freq_factor, the original context
and the rope base (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors) and stores them as
``rope_freqs.weight``; llama.cpp divides each base frequency by its divisor. Loading such a file with plain
rope would be another model at every position, so the reader recovers parameters that Hugging Face's llama3
formula turns into the same frequencies: candidates are the released models' values and values fitted to the
tensor, and one is accepted only if the converter's computation from it reproduces the file's tensor.

Only the ratios of the original context to the two factors matter (scaling all three gives the same
divisors), so a fitted set is written with an integer original context.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from slm_export.errors import ModelLoadError

F32 = np.float32
# The released Llama 3.x values (3.1 and 3.3: factor 8, 3.2: factor 32), tried before any fitted set.
STANDARD = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
STANDARD_FACTORS = (8.0, 32.0)
# How far 1/divisor may lie from the converter's value: the file holds float32 values that the converter
# computed in float32 with a pow kernel that may differ from this one by an ulp or two; about 16 float32
# epsilons of the base frequency. Parameters that differ by this little give the same model.
TOLERANCE = 2e-6


def base_frequencies(theta: float, dim: int) -> np.ndarray:
    """The converter's ``1 / base ** (arange(0, dim, 2) / dim)`` in float32."""
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(F32) / F32(dim)
    return F32(1.0) / np.power(np.float64(theta), exponents.astype(np.float64)).astype(F32)


def converter_rope_freqs(theta: float, dim: int, params: dict[str, float]) -> np.ndarray:
    """``rope_freqs`` as llama.cpp's converter computes it from llama3 rope parameters (float32 steps)."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old = params["original_max_position_embeddings"]
    wavelen = F32(2 * math.pi) / base_frequencies(theta, dim)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        smooth = (F32(old) / wavelen - F32(low)) / F32(high - low)
        blended = F32(1) / ((F32(1) - smooth) / F32(factor) + smooth)
    short, long = wavelen < F32(old / high), wavelen > F32(old / low)
    return np.where(short, F32(1), np.where(long, F32(factor), blended)).astype(F32)


def llama3_rope(freqs: np.ndarray, theta: float, dim: int) -> dict[str, object]:
    """Hugging Face rope parameters (without rope_theta) for a file's ``rope_freqs`` over ``dim`` rotated
    channels: the default rotation when every divisor is 1, else llama3 with parameters whose converter
    tensor matches the file's.

    Raises:
        ModelLoadError: a tensor of the wrong size, with values no llama3 scaling gives, or one that matches
            no parameters tried.
    """
    freqs = np.asarray(freqs, dtype=np.float64).reshape(-1)
    if freqs.shape != (dim // 2,):
        raise ModelLoadError(f"GGUF tensor rope_freqs.weight has {freqs.size} values but the heads rotate {dim} "
                             f"dimensions, which need {dim // 2}")
    if not np.isfinite(freqs).all() or freqs.min() < 1.0 - TOLERANCE:
        raise ModelLoadError("GGUF tensor rope_freqs.weight holds values below 1 or not finite; llama3 rope "
                             "scaling only divides frequencies by factors of 1 or more")
    if np.abs(freqs - 1.0).max() <= TOLERANCE:
        return {"rope_type": "default"}
    for params in _candidates(freqs, theta, dim):
        if _matches(freqs, theta, dim, params):
            return {"rope_type": "llama3", **params}
    raise ModelLoadError(
        f"GGUF tensor rope_freqs.weight (divisors {_preview(freqs)}) does not correspond to a llama3 rope "
        f"scaling this reader can express (rope base {theta:g}, {dim} rotated dimensions); loading without it "
        "would change the model")


def _matches(freqs: np.ndarray, theta: float, dim: int, params: dict[str, float]) -> bool:
    want = converter_rope_freqs(theta, dim, params).astype(np.float64)
    if not np.isfinite(want).all():
        return False
    return bool(np.abs(1.0 / want - 1.0 / freqs).max() <= TOLERANCE)


def _candidates(freqs: np.ndarray, theta: float, dim: int) -> Iterator[dict[str, float]]:
    """The released values with each factor tried, then sets fitted to the blended channels."""
    top = _nice(float(F32(freqs.max())))
    factors = [top] + [f for f in STANDARD_FACTORS if f != top]
    for factor in factors:
        yield {"factor": factor, **STANDARD}
    wavelen = 2 * math.pi / base_frequencies(theta, dim).astype(np.float64)
    for factor in factors:
        yield from _fitted(freqs, wavelen, factor)


def _fitted(freqs: np.ndarray, wavelen: np.ndarray, factor: float) -> Iterator[dict[str, float]]:
    """Parameters fitted to the channels between the kept and the divided ones.

    There the converter's blend is 1/divisor = (1 - s)/factor + s with s = (old/wavelen - low) / (high - low),
    a line in 1/wavelen: s = k / wavelen - c with k = old / (high - low) and c = low / (high - low); the
    boundaries are wavelen = k / (1 + c) (kept below) and k / c (divided above)."""
    if factor <= 1.0:
        return
    kept, divided = freqs <= 1.0 + TOLERANCE, freqs >= factor * (1.0 - TOLERANCE)
    blended = ~kept & ~divided
    s = (1.0 / freqs[blended] - 1.0 / factor) / (1.0 - 1.0 / factor)
    x = 1.0 / wavelen[blended]
    longest_kept = float(wavelen[kept].max()) if kept.any() else 0.0
    shortest_divided = float(wavelen[divided].min()) if divided.any() else math.inf
    if np.unique(x).size >= 2:
        k, neg_c = np.polyfit(x, s, 1)
        k, c = float(k), -float(neg_c)
    elif x.size:
        c = _through_one(float(s[0]), 1.0 / float(x[0]), longest_kept, shortest_divided)
        k = (float(s[0]) + c) / float(x[0])
    else:
        k, c = _step(longest_kept, shortest_divided)
    if not (math.isfinite(k) and math.isfinite(c) and k > 0 and c > 0 and 0.5 <= k / c <= 2**31 - 1):
        return
    old = k / c  # the original context when low_freq_factor is 1
    whole = max(1, round(old))
    low = whole / old
    high = low * (1.0 + 1.0 / c)
    fitted = {"factor": factor, "low_freq_factor": low, "high_freq_factor": high,
              "original_max_position_embeddings": whole}
    yield {**fitted, "low_freq_factor": round(low, 3), "high_freq_factor": round(high, 3)}  # (1 and 4 for 1.00001)
    yield fitted


# high_freq_factor / low_freq_factor tried, in order, where the tensor leaves it open (the release's first).
_RATIOS = (4.0, 3.0, 2.0, 1.5, 1.25)


def _through_one(s: float, wavelen: float, longest_kept: float, shortest_divided: float) -> float:
    """c for a line through one blended channel (s at ``wavelen``) that keeps the channels on either side
    where they are: k / c below the shortest divided wavelength, k / (1 + c) above the longest kept one."""
    need = max(s / (shortest_divided / wavelen - 1.0) if shortest_divided < math.inf else 0.0,
               (longest_kept / wavelen - s) / (1.0 - longest_kept / wavelen))
    for ratio in _RATIOS:
        if 1.0 / (ratio - 1.0) > need:
            return 1.0 / (ratio - 1.0)
    return 2.0 * need


def _step(longest_kept: float, shortest_divided: float) -> tuple[float, float]:
    """(k, c) for no blended channel: both boundaries between the longest kept and shortest divided wavelength."""
    if longest_kept == 0.0:  # every channel divided: any context below the shortest wavelength
        return shortest_divided / 2.0 / 3.0, 1.0 / 3.0
    if shortest_divided == math.inf:
        shortest_divided = 8.0 * longest_kept
    ratio = next((r for r in _RATIOS if r * longest_kept < shortest_divided),
                 math.sqrt(shortest_divided / longest_kept))
    old = math.sqrt(ratio * longest_kept * shortest_divided)  # low_freq_factor 1, high_freq_factor ``ratio``
    return old / (ratio - 1.0), 1.0 / (ratio - 1.0)


def _nice(value: float) -> float:
    """``value`` rounded to 4 decimals when that is within float32 rounding of it (8 for 7.9999995)."""
    rounded = round(value, 4)
    return rounded if abs(rounded - value) <= 4e-7 * max(abs(value), 1.0) else value


def _preview(freqs: np.ndarray) -> str:
    shown = ", ".join(f"{v:.6g}" for v in freqs[:6])
    return f"[{shown}{', ...' if freqs.size > 6 else ''}]"
