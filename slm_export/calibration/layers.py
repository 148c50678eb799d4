"""The compress stage's per-layer quantizers, one per layer kind: weight-only (round-to-nearest, GPTQ, AWQ,
AWQ+GPTQ, or pruning alone) and W8A8 (SmoothQuant static, or dynamic activations). Each quantizes one decoder
layer in place over its calibration statistics (``sequential_calibration``'s step), records what it made in
the run's state, and puts the layer's original tensors back once its outputs exist.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from slm_export.calibration.awq import AWQConfig, awq_quantize
from slm_export.calibration.config import W8A8_METHODS, CompressConfig
from slm_export.calibration.gptq import GPTQConfig, gptq_quantize, prepare_hessian
from slm_export.calibration.observers import fake_quant, make_observer
from slm_export.calibration.quant import QuantizedTensor, quantize_rtn, sqnr_db
from slm_export.calibration.run import CompressRun, layer_entry
from slm_export.calibration.sequential import InputStats, decoder_layers, observe_inputs, submodule
from slm_export.calibration.smoothquant import pow2_weight_scale, quantize_weight
from slm_export.calibration.transforms import apply_rotation, awq_layer, smooth_layer
from slm_export.sparsity import prune

Prepared = dict[tuple[str, int], Any]  # a layer's prepared Hessians, by (use, input statistics): q/k/v share one


def finish_weight_only(w: torch.Tensor, cfg: CompressConfig, st: InputStats | None,
                       prepared: Prepared | None) -> QuantizedTensor | torch.Tensor:
    """A (possibly pruned) weight at ``cfg.bits`` by the configured method; float when only pruning."""
    if not cfg.quantized:
        return w
    keep = (w != 0) if cfg.sparsity is not None else None
    if cfg.method == "rtn" or st is None:
        return quantize_rtn(w, cfg.bits, cfg.group_size, cfg.symmetric, signed=cfg.signed_scales)  # zeros stay zero
    if cfg.method in ("gptq", "awq-gptq"):  # awq-gptq: GPTQ rounding of the AWQ-scaled weights
        gcfg = GPTQConfig(cfg.bits, cfg.group_size, cfg.symmetric, cfg.damp, cfg.act_order, signed=cfg.signed_scales)
        key = ("gptq", id(st))
        if prepared is not None and key not in prepared:  # q/k/v (and gate/up) share one input: factor once
            prepared[key] = prepare_hessian(st.hessian, gcfg)  # type: ignore[arg-type]
        return gptq_quantize(w, prepared[key] if prepared is not None else st.hessian, gcfg, keep)  # type: ignore[arg-type]
    return awq_quantize(w, torch.cat(st.sample), AWQConfig(cfg.bits, cfg.group_size, cfg.symmetric,
                                                           signed=cfg.signed_scales))


def finish_w8a8(w: torch.Tensor, cfg: CompressConfig, st: InputStats | None,
                prepared: Prepared | None) -> QuantizedTensor | torch.Tensor:
    """An int8 weight, per channel (or per tensor with power-of-two scales): GPTQ where the layer's Hessian
    exists; SmoothQuant sets the activation scale after observing the inputs; float when only pruning."""
    if not cfg.quantized:
        return w
    keep = (w != 0) if cfg.sparsity is not None else None
    if st is not None and st.hessian is not None and prepared is not None:
        gcfg = GPTQConfig(8, w.shape[1], True, cfg.damp, cfg.act_order)
        key = ("gptq8", id(st))
        if key not in prepared:
            prepared[key] = prepare_hessian(st.hessian, gcfg)
        grid = torch.tensor([[pow2_weight_scale(w, st.hessian)]]) if cfg.pow2_scales else None
        return gptq_quantize(w, prepared[key], gcfg, keep, scale=grid)
    q = quantize_weight(w, cfg.pow2_scales)
    return replace(q, act_dynamic=True) if cfg.method == "dynamic" else q


def pruned(w: torch.Tensor, cfg: CompressConfig, st: InputStats, prepared: Prepared) -> torch.Tensor:
    """``w`` pruned to the plan's pattern over its input statistics (SparseGPT: their prepared Hessian)."""
    hess = None
    if cfg.sparsity_method == "sparsegpt":
        key = ("sparse", id(st))
        if key not in prepared:
            prepared[key] = prepare_hessian(st.hessian, GPTQConfig(damp=cfg.damp, act_order=False))  # type: ignore[arg-type]
        hess = prepared[key]
    return prune(w, cfg.sparsity_config, st.sq_sum, hess)


class LayerQuantizer:
    """The weight-only kind: AWQ's scales folded first where the method asks, then each linear rounded."""

    finish = staticmethod(finish_weight_only)
    # GPTQ may round linears that read one input as one stacked weight (``quantize_joint``); W8A8's per-tensor
    # power-of-two grids and activation scales are per linear, so its kind says no.
    stacks_siblings = True

    def __init__(self, run: CompressRun) -> None:
        self.run = run
        self.hooks: list[Any] = []  # forward hooks the layer keeps until its outputs exist
        self.started = time.perf_counter()

    def fold(self, i: int, layer: nn.Module, stats: dict[str, InputStats]) -> dict[str, float | None]:
        """Move per-channel scales into the layer before rounding; returns SmoothQuant's alpha per linear."""
        cfg = self.run.cfg
        if cfg.method in ("awq", "awq-gptq"):
            self.run.channel_scales.update(awq_layer(layer, stats, cfg, self.run.traits, self.run.layer_prefix(i)))
        return {}

    def activations(self, i: int, layer: nn.Module, inputs: list, stats: dict[str, InputStats],
                    alphas: dict[str, float | None]) -> None:
        """After the weights: what the layer's activations need (nothing for weight-only)."""

    def step(self, i: int, layer: nn.Module, stats: dict[str, InputStats], inputs: list) -> None:
        """Quantize layer ``i`` in place over its input statistics (``sequential_calibration``'s step)."""
        run = self.run
        prepared: Prepared = {}
        alphas = self.fold(i, layer, stats)
        if i in run.rotations:
            down = submodule(layer, run.traits.down_proj)
            self.hooks.append(apply_rotation(down, run.rotations[i], stats[run.traits.down_proj]))  # type: ignore[arg-type]
        for members in self.siblings(layer, stats):
            if len(members) > 1:
                self.quantize_joint(i, members, stats[members[0][0]], prepared)
            else:
                name, lin = members[0]
                self.quantize_linear(run.name(i, name), lin, stats[name], prepared)
        self.activations(i, layer, inputs, stats, alphas)
        if run.progress:
            n = len(decoder_layers(run.work))
            left = (time.perf_counter() - self.started) / (i + 1) * (n - i - 1)  # layers cost alike
            run.progress(f"layer {i + 1}/{n}" + (f", about {_duration(left)} left" if i + 1 < n else ""))

    def siblings(self, layer: nn.Module, stats: dict[str, InputStats]) -> list[list[tuple[str, nn.Linear]]]:
        """The layer's linears in order, those reading one input (q/k/v, gate/up) together where GPTQ rounds them
        (``quantize_joint``); one by one otherwise (pruning, round-to-nearest, AWQ's clip search, W8A8)."""
        cfg = self.run.cfg
        joint = self.stacks_siblings and cfg.quantized and cfg.method in ("gptq", "awq-gptq") \
            and cfg.sparsity is None
        groups: list[list[tuple[str, nn.Linear]]] = []
        for name, lin in layer.named_modules():
            if not isinstance(lin, nn.Linear):
                continue
            if joint and groups and stats[groups[-1][0][0]] is stats[name] and stats[name].hessian is not None:
                groups[-1].append((name, lin))
            else:
                groups.append([(name, lin)])
        return groups

    def quantize_joint(self, i: int, members: list[tuple[str, nn.Linear]], st: InputStats, prepared: Prepared) -> None:
        """Linears reading one input, rounded by GPTQ as one stacked weight: GPTQ treats rows independently given
        the shared Hessian, so each gets the codes it would alone, in one column loop instead of one per linear."""
        weights = [lin.weight.detach() for _, lin in members]
        q = self.finish(torch.cat(weights), self.run.cfg, st, prepared)
        start = 0
        for (name, lin), w in zip(members, weights, strict=True):
            self.record(self.run.name(i, name), lin, w, q[start:start + w.shape[0]], st)  # type: ignore[index]
            start += w.shape[0]

    def quantize_linear(self, full: str, lin: nn.Linear, st: InputStats, prepared: Prepared) -> None:
        """Prune and quantize one linear; it holds the dequantized weight for the layer's next pass."""
        cfg = self.run.cfg
        w = ref = lin.weight.detach()  # after any smoothing or rotation, before pruning
        if cfg.sparsity is not None:
            w = pruned(w, cfg, st, prepared)
        self.record(full, lin, ref, self.finish(w, cfg, st, prepared), st)

    def record(self, full: str, lin: nn.Linear, ref: torch.Tensor, q: QuantizedTensor | torch.Tensor,
               st: InputStats) -> None:
        """Keep ``q`` as the linear's result, with its report entry; the linear holds its dequantized weight."""
        self.run.keep(full + ".weight", q)
        self.run.report.append(layer_entry(full, ref, q, self.run.cfg, st))
        deq = q.dequantize() if isinstance(q, QuantizedTensor) else q.numpy()
        lin.weight = nn.Parameter(torch.from_numpy(deq), requires_grad=False)

    def done(self, i: int, layer: nn.Module) -> None:
        """Layer ``i``'s outputs exist: keep the float params an algorithm changed (AWQ's folded norms),
        then put the original tensors back so dequantized copies do not pile up."""
        run = self.run
        for name, p in layer.named_parameters():
            full = run.name(i, name)
            read = run.loaded.pop(full, None)  # a streamed layer's parameter as read for this step
            as_read = run.originals[full] if read is None else read()  # None once freed: it was replaced
            if p is not as_read and full not in run.quantized:
                run.changed[full] = p.detach()
        for name, _ in list(layer.named_parameters()):
            parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
            setattr(parent, name.rpartition(".")[2], run.originals[run.name(i, name)])
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


class W8A8Layer(LayerQuantizer):
    """The W8A8 kind: SmoothQuant's scales folded first (static), int8 weights, then (static) each linear's
    activation scale observed over the smoothed, weight-quantized layer."""

    finish = staticmethod(finish_w8a8)
    stacks_siblings = False

    def fold(self, i: int, layer: nn.Module, stats: dict[str, InputStats]) -> dict[str, float | None]:
        if self.run.cfg.method == "smoothquant":
            return smooth_layer(layer, stats, self.run.cfg, self.run.traits, self.run.rotations.get(i))
        return {}

    def activations(self, i: int, layer: nn.Module, inputs: list, stats: dict[str, InputStats],
                    alphas: dict[str, float | None]) -> None:
        if self.run.cfg.method == "smoothquant":  # activation ranges of the smoothed, weight-quantized layer
            self.hooks.extend(calibrate_activations(self.run, i, layer, inputs, alphas, stats))


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def layer_quantizer(run: CompressRun) -> LayerQuantizer:
    """The quantizer for the plan's layer kind: W8A8 for its methods, else weight-only."""
    return W8A8Layer(run) if run.cfg.method in W8A8_METHODS else LayerQuantizer(run)


def calibrate_activations(run: CompressRun, i: int, layer: nn.Module, inputs: list,
                          alphas: dict[str, float | None], stats: dict[str, InputStats]) -> list[Any]:
    """Observe each linear's (smoothed) input over the calibration set, give its quantized weight the
    static activation scale, and hook the layer so that its outputs (the next layer's calibration inputs)
    carry the int8 activation error the runtime will have. Returns the hooks to remove."""
    cfg = run.cfg
    observers = observe_inputs(layer, inputs, lambda: make_observer(cfg.observer))
    entries = {e["layer"]: e for e in run.report}
    hooks = []
    for name, lin in layer.named_modules():
        if not isinstance(lin, nn.Linear):
            continue
        full = run.name(i, name)
        scale = float(observers[name].scale(8, pow2=cfg.pow2_scales))
        run.quantized[full + ".weight"] = replace(run.quantized[full + ".weight"], act_scale=scale)
        x = torch.cat(stats[name].sample)  # smoothed rows of this input
        act_sqnr = sqnr_db(x.numpy(), fake_quant(x, scale).numpy())
        entries[full].update(act_scale=scale, act_observer=cfg.observer, smooth_alpha=alphas.get(name, "none"),
                             act_sqnr_db=round(act_sqnr, 2))
        hooks.append(lin.register_forward_pre_hook(lambda mod, args, s=scale: (fake_quant(args[0], s),)))
    return hooks
