"""Goals: thresholds on measured metrics that decide an artifact's verdict, in one place: the defaults per
precision and method, the ones on cross-checked and emulated runs, and a user's own TOML file."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq}


@dataclass(frozen=True)
class Goal:
    """A threshold on one metric: ``metric op threshold``."""

    metric: str
    op: str
    threshold: Any
    why: str

    def evaluate(self, metrics: dict[str, Any]) -> dict[str, Any]:
        m = metrics.get(self.metric)
        if m is None:
            return {**self.as_dict(), "value": None, "status": "FAIL", "note": "metric was not measured"}
        value = m["value"]
        if not self._finite(value):  # None, NaN or Inf is a broken measurement: never a pass
            return {**self.as_dict(), "value": value, "where": m.get("where"), "status": "FAIL",
                    "note": "the value is not a finite number"}
        ok = _OPS[self.op](abs(value) if self.metric.endswith(("change_pct", "_pp")) else value, self.threshold)
        return {**self.as_dict(), "value": value, "where": m["where"], "status": "PASS" if ok else "FAIL"}

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "op": self.op, "threshold": self.threshold, "why": self.why}

    @staticmethod
    def _finite(value: Any) -> bool:
        """A bool or a finite number (NumPy's too); None, NaN, Inf and text are not."""
        import math

        if value is None or isinstance(value, str | bytes):
            return False
        try:
            return math.isfinite(float(value))
        except (TypeError, ValueError):
            return False


def default_goals(kind: str, precision: str, method: str | None = None, sparsity: str | None = None,
                  budget: float | None = None, pow2: bool = False) -> list[Goal]:
    """Goals an artifact must meet against the float32 reference."""
    if budget is not None:
        return [Goal("perplexity_change_pct", "<=", budget, "the accuracy budget given with --max-ppl-increase")]
    if sparsity:
        return []  # pruning without fine-tuning has no model-independent accuracy bound: report, don't judge
    if kind == "encoder":
        floor = 0.9999 if precision == "fp32" else 0.999
        return [Goal("embedding_cosine_min", ">=", floor, "sentence embeddings must match the reference")]
    if precision == "fp32":
        return [Goal("greedy_match", "==", True, "float32 must continue text exactly as PyTorch does"),
                Goal("perplexity_change_pct", "<=", 0.1, "float32 export must not change perplexity"),
                Goal("top1_agreement", ">=", 0.999, "next-token choice must agree with PyTorch")]
    if precision == "int8" and pow2:
        return [Goal("perplexity_change_pct", "<=", 15.0, "int8 with one power-of-two scale per tensor (weights and "
                     "activations) costs at most 15% perplexity")]
    if precision == "int8" and method in ("smoothquant", "dynamic"):
        return [Goal("perplexity_change_pct", "<=", 2.0, f"W8A8 ({method}) costs at most 2% perplexity")]
    if precision == "int8":
        return [Goal("perplexity_change_pct", "<=", 1.0, "int8 weights cost at most 1% perplexity")]
    if precision == "int4":
        return [Goal("perplexity_change_pct", "<=", 10.0, f"int4 with {method} costs at most 10% perplexity")]
    return [Goal("perplexity_change_pct", "<=", 1.0, f"{precision} rounding of weights costs at most 1% perplexity"),
            Goal("top1_agreement", ">=", 0.97, "next-token choice must mostly agree with PyTorch")]


def load_goals(path: str | Path) -> list[Goal]:
    """Goals from a TOML file, replacing the defaults: one table per metric with ``max``, ``min`` or
    ``equals`` (and an optional ``why``), e.g. ``[perplexity_change_pct]`` / ``max = 5.0``, or
    ``[device_decode_tokens_per_s_p50]`` / ``min = 10``. ``*_change_pct`` and ``*_pp`` metrics compare
    their magnitude, so ``max`` is a maximum degradation either way."""
    import tomllib

    from slm_export.errors import ConfigError

    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"--goals {path}: cannot read it ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--goals {path}: not valid TOML ({exc})") from None
    goals = []
    ops = {"max": "<=", "min": ">=", "equals": "=="}
    for metric, spec in data.get("goals", data).items():
        if not isinstance(spec, dict) or not set(spec) - {"why"} or set(spec) - {"why", *ops}:
            raise ConfigError(f"--goals {path}: [{metric}] needs one of max, min or equals (and optionally why)")
        for key, op in ops.items():
            if key in spec:
                if not isinstance(spec[key], bool | int | float):
                    raise ConfigError(f"--goals {path}: [{metric}] {key} must be a number or true/false")
                goals.append(Goal(metric, op, spec[key], str(spec.get("why", f"from {Path(path).name}"))))
    if not goals:
        raise ConfigError(f"--goals {path}: no goals in it")
    return goals


# Two runtimes of the same int4 weights that each quantize activations to int8 their own way (blocks, rows,
# tokens) choose the same next token less often than float runtimes do; a wrong kernel or a broken file lands
# far below this floor (the measurements behind it: docs/validation.md).
ACT_QUANT_AGREEMENT = 0.93


def run_goals(metrics: dict[str, Any], quantized: bool, act_quant: bool = False) -> list[Goal]:
    """Goals on the cross-check and emulated runs present in ``metrics``. ``act_quant``: the runtime
    quantizes activations itself (W8A8, or MatMulNBits at accuracy level 4 on a CPU with dot products),
    each ISA's kernels in its own way (blocks, rounding), so next tokens agree less closely."""
    goals = []
    for name in metrics:
        if name.startswith("emulated_") and name.endswith("_agreement_with_host"):
            if act_quant:
                goals.append(Goal(name, ">=", ACT_QUANT_AGREEMENT, "the target's aarch64 kernels (emulated) "
                                  "quantize activations their own way: they must choose the host's next tokens as "
                                  "often as two int8-activation runtimes of the same weights do on the host"))
            else:
                goals.append(Goal(name, ">=", 0.99, "the target's own aarch64 runtime (emulated) must choose the "
                                  "same next tokens as the host run of the same file"))
        if name.endswith("_perplexity_change_vs_host_pp") or name.endswith("_perplexity_change_vs_validated_pp"):
            goals.append(Goal(name, "<=", 0.5, "every runtime of the artifact must reach the same perplexity change "
                              "as the validated file, within half a percentage point"))
        if name.endswith("_greedy_equals_validated") and not quantized:
            goals.append(Goal(name, "==", True, "a float artifact continues text the same in every runtime"))
    return goals


def choose(kind: str, plan: Any, metrics: dict[str, Any], goals_file: str | None = None) -> list[Goal]:
    """The goals a run is judged by: the user's file, else the defaults for the plan and the runs it made."""
    if goals_file:
        return load_goals(goals_file)
    quantized = plan.precision in ("int8", "int4")
    act_quant = quantized and (plan.method in ("smoothquant", "dynamic") or plan.accuracy_level == 4)
    return default_goals(kind, plan.precision, plan.method, plan.sparsity, plan.max_ppl_increase,
                         plan.pow2_scales) + run_goals(metrics, quantized, act_quant)


def judge(wanted: list[Goal], metrics: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Each goal evaluated, and the verdict: PASS, FAIL, NO GOALS, or NOT VALIDATED (nothing measured)."""
    if not metrics:
        return [], "NOT VALIDATED"
    goals = [g.evaluate(metrics) for g in wanted]
    if not wanted:
        return goals, "NO GOALS"
    return goals, "PASS" if all(g["status"] == "PASS" for g in goals) else "FAIL"
