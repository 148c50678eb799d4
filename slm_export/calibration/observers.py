"""Activation observers: what a tensor looked like over the calibration set -> an int8 range.

Registered by name (``OBSERVERS``): ``minmax``, ``moving-average`` (min-max averaged batch by batch),
``percentile`` (of |x|, from a histogram), ``entropy`` (the threshold that minimises the KL divergence
between the float and the quantized histogram, TensorRT's calibrator) and ``mse`` (the threshold that
minimises the expected squared quantization error, from the same histogram).

Granularities: ``per-tensor`` (one range), ``per-channel`` (one per last-dimension channel),
``per-group`` (one per ``group`` consecutive channels). ``per-token`` ranges cannot be calibrated: they
are computed at run time (the ``dynamic`` int8 method), and ``fake_quant_per_token`` simulates them.
The histogram observers are per-tensor (one histogram a tensor; a histogram a channel costs too much).
"""

from __future__ import annotations

import difflib

import numpy as np
import torch

from slm_export.errors import ConfigError

GRANULARITIES = ("per-tensor", "per-channel", "per-group", "per-token")
BINS = 2048


class Observer:
    """Accumulates statistics with ``update``; ``amax`` gives the symmetric clipping threshold(s)."""

    name = "observer"
    granularities: tuple[str, ...] = ("per-tensor", "per-channel", "per-group")

    def __init__(self, granularity: str = "per-tensor", group: int = 32) -> None:
        if granularity == "per-token":
            raise ConfigError("per-token ranges are computed at run time (--method dynamic), not calibrated")
        if granularity not in self.granularities:
            raise ConfigError(f"observer {self.name!r} supports {', '.join(self.granularities)}, not {granularity!r}")
        self.granularity, self.group = granularity, group
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.batches = 0

    def _reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.granularity == "per-tensor":
            return x.min(), x.max()
        if self.granularity == "per-group":
            if x.shape[1] % self.group:
                raise ConfigError(f"group {self.group} does not divide {x.shape[1]} channels")
            g = x.reshape(x.shape[0], -1, self.group)
            return g.amin(dim=(0, 2)), g.amax(dim=(0, 2))
        return x.amin(0), x.amax(0)

    def update(self, x: torch.Tensor) -> None:
        lo, hi = self._reduce(x)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        self.batches += 1

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None or self.hi is None:
            raise RuntimeError(f"observer {self.name} saw no data")
        return self.lo, self.hi

    def amax(self) -> torch.Tensor:
        lo, hi = self.range()
        return torch.maximum(lo.abs(), hi.abs())

    def scale(self, bits: int = 8, pow2: bool = False) -> torch.Tensor:
        """Symmetric scale(s): threshold / (2**(bits-1) - 1); a power of two if asked (``pow2_scale``)."""
        if pow2:
            return self.pow2_scale(bits)
        return (self.amax() / ((1 << (bits - 1)) - 1)).clamp_min(1e-8)

    def pow2_scale(self, bits: int = 8) -> torch.Tensor:
        """Min-max: the threshold's scale rounded up to a power of two, so nothing seen is clipped."""
        s = (self.amax() / ((1 << (bits - 1)) - 1)).clamp_min(1e-8)
        return torch.exp2(torch.ceil(torch.log2(s)))


class MinMaxObserver(Observer):
    name = "minmax"


class MovingAverageObserver(Observer):
    """Per-batch min and max, averaged with weight ``c`` for each new batch (PyTorch's default 0.01)."""

    name = "moving-average"

    def __init__(self, granularity: str = "per-tensor", group: int = 32, c: float = 0.01) -> None:
        super().__init__(granularity, group)
        self.c = c

    def update(self, x: torch.Tensor) -> None:
        lo, hi = self._reduce(x)
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.lo + self.c * (lo - self.lo)
            self.hi = self.hi + self.c * (hi - self.hi)
        self.batches += 1


class HistogramObserver(Observer):
    """A histogram of |x| over [0, width * BINS]; when a larger value arrives the range doubles and
    pairs of bins merge, so the counts stay exact at the coarser width."""

    granularities = ("per-tensor",)

    def __init__(self, granularity: str = "per-tensor", group: int = 32) -> None:
        super().__init__(granularity, group)
        self.counts = np.zeros(BINS, np.float64)
        self.width = 0.0

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().reshape(-1).float().abs()
        top = float(a.max())
        if self.width == 0.0:
            self.width = max(top, 1e-8) / BINS
        while top > self.width * BINS:
            self.counts = np.concatenate([self.counts.reshape(-1, 2).sum(1), np.zeros(BINS // 2)])
            self.width *= 2
        idx = torch.clamp((a / self.width).long(), max=BINS - 1)
        self.counts += torch.bincount(idx, minlength=BINS).double().numpy()
        lo, hi = super()._reduce(x)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        self.batches += 1

    def _last_bin(self) -> int:
        nz = np.nonzero(self.counts)[0]
        return int(nz[-1]) + 1 if nz.size else 1

    def threshold(self) -> float:
        raise NotImplementedError

    def amax(self) -> torch.Tensor:
        if self.batches == 0:
            raise RuntimeError(f"observer {self.name} saw no data")
        return torch.tensor(self.threshold(), dtype=torch.float32)

    def squared_error(self, step: float, bits: int = 8) -> float:
        """Expected squared error over the histogram of symmetric quantization with this step: each
        bin's centre rounded to the grid inside the range, clipped to its end outside."""
        last = self._last_bin()
        centers = (np.arange(last) + 0.5) * self.width
        qmax = (1 << (bits - 1)) - 1
        q = np.minimum(np.round(centers / step), qmax) * step
        return float(np.sum(self.counts[:last] * (centers - q) ** 2))

    def pow2_candidates(self, bits: int) -> list[float]:
        """The powers of two either side of this observer's threshold."""
        k = np.log2(max(float(self.amax()) / ((1 << (bits - 1)) - 1), 1e-30))
        return [2.0 ** np.floor(k), 2.0 ** np.ceil(k)]

    def pow2_scale(self, bits: int = 8) -> torch.Tensor:
        """The power-of-two step with the least squared error over the histogram among the candidates
        (what a DPU quantizer's "diffs" method does, rather than always rounding the range up)."""
        cands = self.pow2_candidates(bits)
        errs = [self.squared_error(c, bits) for c in cands]
        return torch.tensor(cands[int(np.argmin(errs))], dtype=torch.float32)


class PercentileObserver(HistogramObserver):
    name = "percentile"

    def __init__(self, granularity: str = "per-tensor", group: int = 32, percentile: float = 99.99) -> None:
        super().__init__(granularity, group)
        self.percentile = percentile

    def threshold(self) -> float:
        cdf = np.cumsum(self.counts) / self.counts.sum()
        i = int(np.searchsorted(cdf, self.percentile / 100.0))
        return (min(i, BINS - 1) + 1) * self.width


class EntropyObserver(HistogramObserver):
    """TensorRT's entropy calibration: for each candidate threshold i (in bins), P is the histogram up
    to i with the clipped tail added to its last bin, Q is P merged into 127 levels and spread back over
    the non-empty bins; the threshold with the least KL(P || Q) wins."""

    name = "entropy"
    levels = 128

    def threshold(self) -> float:
        counts = self.counts
        last = self._last_bin()
        if last <= self.levels:
            return last * self.width
        best, best_i = np.inf, last
        for i in range(self.levels, last + 1, max(1, (last - self.levels) // 256)):
            p = counts[:i].copy()
            p[-1] += counts[i:].sum()
            nonzero = counts[:i] != 0
            edges = np.linspace(0, i, self.levels + 1).astype(int)
            q = np.zeros(i)
            for lo, hi in zip(edges[:-1], edges[1:], strict=True):
                nz = nonzero[lo:hi]
                n = nz.sum()
                if n:
                    q[lo:hi][nz] = counts[lo:hi].sum() / n
            ps, qs = p.sum(), q.sum()
            if qs == 0:
                continue
            pn, qn = p / ps, q / qs
            mask = pn > 0
            if np.any(qn[mask] == 0):
                continue
            kl = float(np.sum(pn[mask] * np.log(pn[mask] / qn[mask])))
            if kl < best:
                best, best_i = kl, i
        return best_i * self.width


class MSEObserver(HistogramObserver):
    """The threshold t minimising the squared error of symmetric int8 over the histogram: each bin's
    centre rounded to the grid of step t/127 inside [-t, t], clipped to t outside. Candidates run
    geometrically from the largest value down to 1/256 of it."""

    name = "mse"

    def threshold(self) -> float:
        top = self._last_bin() * self.width
        cands = top * np.exp2(-np.arange(0, 64) / 8.0)
        errs = [self.squared_error(t / 127.0) for t in cands]
        return float(cands[int(np.argmin(errs))])

    def pow2_candidates(self, bits: int) -> list[float]:
        """Every power of two from the one that clips nothing down to 1/256 of it."""
        top = self._last_bin() * self.width / ((1 << (bits - 1)) - 1)
        k = int(np.ceil(np.log2(max(top, 1e-30))))
        return [2.0 ** (k - i) for i in range(9)]


OBSERVERS: dict[str, type[Observer]] = {o.name: o for o in (MinMaxObserver, MovingAverageObserver,
                                                             PercentileObserver, EntropyObserver, MSEObserver)}


def make_observer(name: str, granularity: str = "per-tensor", group: int = 32) -> Observer:
    """An observer by registered name; unknown names get the closest match in the message."""
    cls = OBSERVERS.get(name)
    if cls is None:
        close = difflib.get_close_matches(name, list(OBSERVERS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown observer {name!r}{hint} Observers: {', '.join(OBSERVERS)}")
    return cls(granularity, group)


def check_observer(name: str, granularity: str = "per-tensor") -> None:
    """Refuse a bad observer or granularity before any work."""
    make_observer(name, granularity)


def fake_quant(x: torch.Tensor, scale: torch.Tensor | float, bits: int = 8) -> torch.Tensor:
    """Symmetric quantize-dequantize with the given scale(s) (saturating like QuantizeLinear)."""
    qmax = (1 << (bits - 1)) - 1
    return torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale


def per_token_scale(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """The run-time scale of dynamic per-token quantization: max |x| of each row / 127."""
    return (x.abs().amax(-1, keepdim=True) / ((1 << (bits - 1)) - 1)).clamp_min(1e-8)


def fake_quant_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    return fake_quant(x, per_token_scale(x, bits), bits)
