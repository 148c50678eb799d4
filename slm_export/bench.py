"""What the bench scripts (``scripts/bench_*.py``) share: interleaved timing rounds, paired ratios, tables, and
building an artifact through the CLI's plan in a fresh process.

Timing: every system is run once per round, in an order rotated each round, so that a machine whose speed
drifts over minutes (a shared box) slows every system alike; a system's figure is its median over the
rounds, and a comparison between two systems is the median of their per-round ratios, with the middle half of
those ratios (25th to 75th percentile) beside it: on a shared box one run's median can sit 10% from the
next run's, and a check passed or failed inside that range says little.

    >>> rates = interleaved_rounds({"a": run_a, "b": run_b}, rounds=5)
    >>> paired_ratio(rates["a"], rates["b"]).median

Only the standard library is imported here; NumPy where a figure is computed.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

# A system under test: one greedy generation; returns (seconds to the first token, seconds of each later token).
Runner = Callable[[], tuple[float, list[float]]]


@dataclass(frozen=True)
class Rates:
    """One system's figures over the rounds: decode tokens/s (tokens after the first over their seconds) and the
    time to the first token, a value per round, in round order."""

    tok_s_all: list[float]
    ttft_s_all: list[float]

    @property
    def tok_s(self) -> float:
        """Median decode tokens/s over the rounds."""
        import numpy as np

        return float(np.median(self.tok_s_all))

    @property
    def ttft_s(self) -> float:
        """Median time to the first token over the rounds (seconds)."""
        import numpy as np

        return float(np.median(self.ttft_s_all))


def interleaved_rounds(runs: Mapping[str, Runner], rounds: int, *, rotate: bool = True, idle_s: float = 0.0,
                       warmup: Mapping[str, Callable[[], Any]] | None = None,
                       log: TextIO | None = sys.stderr) -> dict[str, Rates]:
    """One untimed warm-up of each system (its runner, or ``warmup[name]`` where given), then ``rounds``
    rounds that run every system once: in ``runs``' order, rotated by one each round unless ``rotate`` is
    False. ``idle_s``: a pause before each timed run, so that the previous system's worker threads (ONNX
    Runtime's and OpenMP's spin a while after a run) have gone idle. ``log``: progress lines (None: quiet)."""
    names = list(runs)
    warmup = warmup or {}
    for name in names:
        if log is not None:
            print(f"  warm-up {name} ...", file=log, flush=True)
        warmup.get(name, runs[name])()
    ttft: dict[str, list[float]] = {n: [] for n in names}
    rate: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            if idle_s:
                time.sleep(idle_s)
            first, steps = runs[name]()
            ttft[name].append(first)
            rate[name].append(len(steps) / sum(steps))
        if log is not None:
            print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {rate[n][-1]:.1f}" for n in names), file=log,
                  flush=True)
    return {n: Rates(rate[n], ttft[n]) for n in names}


@dataclass(frozen=True)
class Ratio:
    """Per-round ratios of one system's tokens/s over another's: their median and middle half."""

    median: float
    low: float  # 25th percentile
    high: float  # 75th percentile

    @property
    def spread(self) -> str:
        """The middle half as the benches print it: ``low-high``, three decimals."""
        return f"{self.low:.3f}-{self.high:.3f}"


def round_ratios(a: Rates, b: Rates) -> list[float]:
    """a's tokens/s over b's, round by round."""
    import numpy as np

    return [float(x) for x in np.asarray(a.tok_s_all) / np.asarray(b.tok_s_all)]


def paired_ratio(a: Rates, b: Rates) -> Ratio:
    """The median over the rounds of a's tokens/s over b's in the same round, and the middle half of them."""
    import numpy as np

    ratios = np.asarray(a.tok_s_all) / np.asarray(b.tok_s_all)
    low, high = np.percentile(ratios, [25, 75])
    return Ratio(float(np.median(ratios)), float(low), float(high))


def paired_ratios(rates: Mapping[str, Rates], baseline: str, names: Sequence[str] | None = None) -> dict[str, Ratio]:
    """``paired_ratio`` of each system (``names``, default all but the baseline) against ``baseline``."""
    names = [n for n in rates if n != baseline] if names is None else list(names)
    return {n: paired_ratio(rates[n], rates[baseline]) for n in names}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], style: str = "markdown") -> str:
    """Rows of cells (formatted already, or ``str()`` of them) as a table: ``markdown`` (``| a | b |`` under a
    ``|---|---|`` rule, as the benches print them) or ``plain`` (columns padded to their widest cell)."""
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    if style == "markdown":
        lines = ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join([lines[0], "|" + "---|" * len(headers), *lines[1:]])
    if style == "plain":
        width = [max(len(r[i]) for r in cells if i < len(r)) for i in range(len(headers))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, width, strict=False)).rstrip() for r in cells)
    raise ValueError(f"table style is markdown or plain, not {style!r}")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], style: str = "markdown",
                file: TextIO | None = None) -> None:
    """``table`` printed (to stdout unless ``file``)."""
    print(table(headers, rows, style), file=file or sys.stdout)


# ---- building artifacts ---------------------------------------------------------------------------
def in_fresh_process(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a new Python process (spawned, not forked), so that its time, peak RSS and
    imports are its own, as a CLI run's are; returns its result, raises its exception. ``fn`` must be importable
    (a module-level function); the child's stdout goes to stderr, leaving the bench's own output clean."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_stdout_to_stderr, fn, args, kwargs).result()


# Loggers the CLI quiets too: torchao (imported by transformers and ExecuTorch) reports its CUDA kernels missing on
# CPU torch, and torch's pytree notes deprecations about torchao's enums.
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def _stdout_to_stderr(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    import logging

    sys.stdout.flush()
    os.dup2(2, 1)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    return fn(*args, **kwargs)


def export_report(model: str, target: str, out: str | Path, precision: str | None = None, *, validate: bool = True,
                  settings: Any = None, **options: Any) -> dict[str, Any]:
    """``slm_export.export`` (``make_plan``, then ``run``: the CLI's plan and defaults) and the report it wrote,
    whether or not its goals passed (a missed goal leaves the artifact and its report, as the CLI does)."""
    import slm_export

    return slm_export.export(model, target, out, precision, validate=validate, settings=settings, **options).report


__all__ = ["Ratio", "Rates", "Runner", "export_report", "in_fresh_process", "interleaved_rounds", "paired_ratio",
           "paired_ratios", "print_table", "round_ratios", "table"]
