"""Mixed precision to an accuracy budget.

Each projection group (q/k/v, o, gate/up, down of every layer) is scored by the KL divergence of the
model's next-token distribution when only that group is quantized (on calibration windows). Then the
most sensitive groups are raised to int8, the fewest that bring the perplexity change within the budget
(binary search over how many, most sensitive first). The search measures that change on a held-out tail
of the calibration text (``data.split_calibration``), which the calibration samples never reach and
which is not the evaluation text: the evaluation figure in the report is then a measurement of the
choice, not the target it was tuned to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from slm_export.calibration.quant import QuantizedTensor, quantize_rtn
from slm_export.errors import NonFiniteOutput, ValidationFailed
from slm_export.models.traits import ArchTraits, traits_for


@dataclass(frozen=True)
class BudgetResult:
    weights: dict[str, Any]
    kept_int8: list[str]
    sensitivity: list[tuple[str, float]]
    perplexity_change_pct: float
    nominal_bits: float


def _units(weights: dict[str, Any], traits: ArchTraits) -> dict[str, list[str]]:
    """The quantized weights of each layer's projection groups (``ArchTraits.projection_groups``), by unit name."""
    units: dict[str, list[str]] = {}
    prefix = traits.layers + "."
    for name, w in weights.items():
        if not isinstance(w, QuantizedTensor) or not name.startswith(prefix):
            continue
        layer = name[len(prefix):].split(".")[0]
        for group, members in traits.projection_groups:
            if any(name.endswith(m + ".weight") for m in members):
                units.setdefault(f"layers.{layer}.{group}", []).append(name)
    return units


def _nominal_bits(weights: dict[str, Any], traits: ArchTraits) -> float:
    """Mean code bits of the decoder layers' quantized weights: what the budget chooses (the LM head's
    precision is a separate setting, --lm-head-bits)."""
    bits = count = 0
    for name, w in weights.items():
        if isinstance(w, QuantizedTensor) and name.startswith(traits.layers + "."):
            bits += w.bits * w.size
            count += w.size
    return bits / max(count, 1)


def _perplexity(module: Any, windows: list[list[int]]) -> float:
    nll = n = 0.0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            lp = torch.log_softmax(module(ids).logits[0, :-1].double(), -1)
            nll -= float(lp[torch.arange(len(w) - 1), ids[0, 1:]].sum())
            n += len(w) - 1
    return float(np.exp(nll / n))


def scaled_floats(model_weights: dict[str, Any], names: list[str],
                  channel_scales: dict[str, tuple[Any, Any]] | None) -> dict[str, torch.Tensor]:
    """The float weights the int4 codes approximate: ``W * cols / rows[:, None]`` where AWQ rescaled
    them (``CompressResult.channel_scales``), else ``W``."""
    out = {}
    for n in names:
        w = model_weights[n]
        cols, rows = (channel_scales or {}).get(n, (None, None))
        if cols is not None:
            w = w * cols
        if rows is not None:
            w = w / rows[:, None]
        out[n] = w
    return out


def float_twin(model: Any, weights: dict[str, Any], float_w: dict[str, torch.Tensor],
               channel_scales: dict[str, tuple[Any, Any]] | None) -> Any:
    """The float model in the compressed basis: folded norms from ``weights``, the layers' linears as
    ``float_w`` (``W * s``). The same function as the original model, since the folding is exact. Its LM
    head is the original float one, so where AWQ folded the head's scales into the final norm, the twin
    keeps the original norm."""
    from dataclasses import replace

    from slm_export.models.loader import build_module

    traits = traits_for(model.model_type, model.config)
    floats = {k: v for k, v in weights.items() if not isinstance(v, QuantizedTensor)}
    producer = traits.head_producer(weights)
    if traits.lm_head in (channel_scales or {}) and producer is not None:
        floats.pop(producer[0] + ".weight", None)
        floats.pop(producer[0] + ".bias", None)
    return build_module(replace(model, weights={**model.weights, **floats, **float_w}, _module=[]))


def int8_weights(float_w: dict[str, torch.Tensor], int4: dict[str, Any], group: int) -> dict[str, QuantizedTensor]:
    """Round-to-nearest int8 of each float weight, with its int4 twin's symmetry (ExecuTorch's XNNPACK
    GEMMs take no zero points)."""
    return {n: quantize_rtn(w, 8, group, int4[n].zeros is None) for n, w in float_w.items()}


class _Twin:
    """The float twin whose projection groups take float, int4 or int8 values in turn."""

    def __init__(self, module: Any, units: dict[str, list[str]]) -> None:
        self.module, self.units = module, units

    def use(self, table: dict[str, torch.Tensor], names: list[str]) -> None:
        for n in names:
            mod = self.module.get_submodule(n.rsplit(".", 1)[0])
            mod.weight = torch.nn.Parameter(torch.as_tensor(table[n]), False)

    def log_probs(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(self.module(ids).logits.float(), -1)

    def sensitivity(self, probe: torch.Tensor, deq4: dict[str, torch.Tensor],
                    float_w: dict[str, torch.Tensor]) -> list[tuple[str, float]]:
        """Each unit's KL divergence on ``probe`` with only that unit at int4, most sensitive first."""
        ref = self.log_probs(probe)
        sens = []
        for unit, members in self.units.items():
            self.use(deq4, members)
            lp = self.log_probs(probe)
            sens.append((unit, float((ref.exp() * (ref - lp)).sum(-1).mean())))
            self.use(float_w, members)
        sens.sort(key=lambda t: -t[1])
        return sens


@dataclass
class _Search:
    """The perplexity change on ``windows`` with the ``k`` most sensitive units at int8 and the rest at int4."""

    twin: _Twin
    sens: list[tuple[str, float]]
    deq4: dict[str, torch.Tensor]
    deq8: dict[str, torch.Tensor]
    windows: list[list[int]]
    ppl_ref: float
    cache: dict[int, float] = field(default_factory=dict)

    def change(self, k: int) -> float:
        if k not in self.cache:
            for i, (unit, _) in enumerate(self.sens):
                self.twin.use(self.deq8 if i < k else self.deq4, self.twin.units[unit])
            self.cache[k] = 100.0 * (_perplexity(self.twin.module, self.windows) / self.ppl_ref - 1.0)
        return self.cache[k]

    def fewest_within(self, budget_pct: float, progress: Callable[[str], None] | None) -> int:
        """The smallest ``k`` whose change is within ``budget_pct`` (binary search; NaN is never within it)."""
        lo, hi = 0, len(self.sens)
        if not math.isfinite(self.change(hi)):
            raise NonFiniteOutput(f"the budget's search: with every group at int8 the quantized model's perplexity "
                                  f"change is {self.change(hi)}: its weights give NaN or Inf logits in PyTorch")
        if self.change(hi) > budget_pct:
            raise ValidationFailed(f"even with every group at int8 the perplexity change exceeds {budget_pct}%")
        while lo < hi:
            mid = (lo + hi) // 2
            if self.change(mid) <= budget_pct:
                hi = mid
            else:
                lo = mid + 1
            if progress:
                progress(f"budget search: {lo}..{hi} groups at int8")
        return lo


def mixed_precision(model: Any, weights: dict[str, Any], budget_pct: float, calib_ids: np.ndarray,
                    windows: list[list[int]], group: int,
                    progress: Callable[[str], None] | None = None,
                    channel_scales: dict[str, tuple[Any, Any]] | None = None) -> BudgetResult:
    """Raise the most sensitive projection groups from int4 to int8 until the perplexity change on
    ``windows`` (the held-out calibration text's, in the pipeline) is within ``budget_pct``.

    ``channel_scales``: the compress stage's AWQ scales (``weights`` then holds the norms they were
    folded into, and int4 codes of ``W * s``): the int8 groups quantize ``W * s`` too.
    """
    traits = traits_for(model.model_type, model.config)
    units = _units(weights, traits)
    names = [n for members in units.values() for n in members]
    float_w = scaled_floats(model.weights, names, channel_scales)
    twin = _Twin(float_twin(model, weights, float_w, channel_scales), units)
    deq4 = {n: torch.from_numpy(weights[n].dequantize()) for n in names}
    int8 = int8_weights(float_w, weights, group)
    deq8 = {n: torch.from_numpy(q.dequantize()) for n, q in int8.items()}
    probe = torch.from_numpy(calib_ids[: min(2, len(calib_ids)), :128])  # ranking only: small and cheap
    sens = twin.sensitivity(probe, deq4, float_w)
    if progress:
        progress("sensitivity ranked")
    twin.use(float_w, names)
    ppl_ref = _perplexity(twin.module, windows)
    if not math.isfinite(ppl_ref):
        raise NonFiniteOutput(f"the budget's search: the float model's perplexity on its windows is {ppl_ref}; "
                              "the model's weights or the text give NaN or Inf logits in PyTorch")
    search = _Search(twin, sens, deq4, deq8, windows, ppl_ref)
    lo = search.fewest_within(budget_pct, progress)
    kept = [unit for unit, _ in sens[:lo]]
    out = dict(weights)
    for unit in kept:
        for n in units[unit]:
            out[n] = int8[n]
    return BudgetResult(out, kept, sens, search.change(lo), _nominal_bits(out, traits))


BUDGET_MARGIN = 0.9  # search against 90% of the budget: the runtime's int8 activations add a little
PROBE_SAMPLES, PROBE_LEN = 8, 256  # the sensitivity ranking's calibration samples (it reads 2 x 128 of them)


def fit_budget(model: Any, compressed: Any, plan: Any, progress: Callable[[str, str], None] | None) -> Any:
    """The pipeline's budget stage: the compress stage's result with the fewest groups raised to int8,
    fitted on the held-out tail of the calibration text. The evaluation text is not read here: the
    budget's ``eval_ppl_change_pct`` is left None for validation's figure."""
    from dataclasses import replace as dc_replace

    from slm_export.calibration.data import check_budget_sources, split_calibration

    check_budget_sources(plan.calib_data, plan.eval_data)
    split = split_calibration(model.tokenizer, plan.calib_data, max(plan.calib_seqlen, PROBE_LEN))
    probe = split.samples(PROBE_SAMPLES, PROBE_LEN, plan.seed)
    windows = split.windows()
    step = (lambda what: progress("budget", what)) if progress else None
    fit = mixed_precision(model, compressed.weights, plan.max_ppl_increase * BUDGET_MARGIN, probe.ids,  # type: ignore[operator]
                          windows, plan.group_size, step, compressed.channel_scales)
    fitted_on = split.describe_heldout()
    # The compress stage drew its samples from the head too (CompressConfig.calib_holdout) unless it read
    # no data at all (round-to-nearest): only then is the held-out tail text the weights never saw.
    calib = compressed.calibration
    disjoint = calib is None or calib.get("heldout_tokens") == fitted_on["tokens"]
    note = (f"accuracy budget {plan.max_ppl_increase}%: {len(fit.kept_int8)} of {len(fit.sensitivity)} projection "
            f"groups kept at int8 (searched against {BUDGET_MARGIN:.0%} of the budget in PyTorch on "
            f"{fitted_on['tokens']} held-out calibration tokens, not the evaluation text: "
            f"{fit.perplexity_change_pct:+.2f}%); mean nominal bits per weight {fit.nominal_bits:.2f}")
    if not disjoint:
        note += ("; the calibration samples were drawn from the whole calibration text, the held-out tail "
                 "included")
    return dc_replace(compressed, weights=fit.weights, notes=[*compressed.notes, note],
                      budget={"max_ppl_increase_pct": plan.max_ppl_increase, "kept_int8": fit.kept_int8,
                              "sensitivity_kl": fit.sensitivity, "nominal_bits_per_weight": fit.nominal_bits,
                              "fitted_on": fitted_on, "searched_against_pct": plan.max_ppl_increase * BUDGET_MARGIN,
                              "heldout_ppl_change_pct": fit.perplexity_change_pct,
                              "calibration_disjoint_from_heldout": disjoint,
                              "eval_ppl_change_pct": None})
