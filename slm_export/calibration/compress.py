"""The compress stage: weight quantization chosen by the plan, run layer by layer.

Returns a weights mapping for the exporter (Hugging Face names -> float arrays or QuantizedTensor),
with per-layer SQNR of weights and (when calibration data is used) of the layer outputs. The units:
the per-layer quantizers (``layers.py``), the LM head (``head.py``) and end-to-end tuning (``tune.py``),
each reading and filling one ``CompressRun`` (``run.py``).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from slm_export.calibration.config import FOLDING_METHODS, CompressConfig
from slm_export.calibration.data import CalibrationSet, load_calibration
from slm_export.calibration.head import collect_head_inputs, quantize_lm_head
from slm_export.calibration.layers import layer_quantizer
from slm_export.calibration.quant import check_group
from slm_export.calibration.run import ChannelScales, CompressRun, bits_per_weight, layer_entry
from slm_export.calibration.sequential import decoder_layers, sequential_calibration, traits_of, trim_heap
from slm_export.calibration.transforms import rotate_down, rotate_heads
from slm_export.calibration.tune import tune_end_to_end
from slm_export.errors import ConfigError
from slm_export.models.lazy import Overlay
from slm_export.models.traits import ArchTraits, traits_for
from slm_export.sparsity import prune

__all__ = ["CompressConfig", "CompressResult", "compress"]


@dataclass(frozen=True)
class CompressResult:
    weights: dict[str, Any]
    layers: list[dict[str, Any]]
    calibration: dict[str, Any] | None
    seconds: float
    bits_per_weight: float | None
    notes: list[str] = field(default_factory=list)
    budget: dict[str, Any] | None = None
    # AWQ: how each linear's float weight was rescaled before quantization, ``(cols, rows)``: its columns
    # multiplied by its input's scale s, its rows divided by the scale of the linear it feeds (up_proj
    # before down_proj), None where not; a later step can requantize ``W * cols / rows[:, None]`` (the
    # accuracy budget's int8 groups).
    channel_scales: ChannelScales = field(default_factory=dict)
    tuning: dict[str, Any] | None = None  # end-to-end tuning's summary (``tune.py``), when it ran


def linear_names(module: nn.Module) -> dict[str, nn.Linear]:
    """Every linear inside the decoder layers, by its full parameter prefix."""
    out = {}
    prefix = traits_of(module).layers
    for i, layer in enumerate(decoder_layers(module)):
        for name, m in layer.named_modules():
            if isinstance(m, nn.Linear):
                out[f"{prefix}.{i}.{name}"] = m
    return out


def compress(model: Any, cfg: CompressConfig, progress: Callable[[str], None] | None = None) -> CompressResult:
    """Quantize ``model``'s decoder linears per ``cfg``; the model's own weights are left untouched."""
    traits = check_supported(model, cfg)
    t0 = time.perf_counter()
    run = start_run(model, cfg, traits, progress)
    if cfg.needs_data:
        calibrate_layers(run)
    else:
        quantize_without_data(run)
    weights = assemble(run)
    if cfg.lm_head_bits:
        quantize_lm_head(run, weights)
    tuned = None
    if cfg.tune_epochs:
        weights, tuned = tune(run, weights)
    # Only meaningful when weights are quantized: pruned float weights are stored dense at the artifact's
    # float width, which the compress stage does not decide.
    bpw = bits_per_weight(weights) if cfg.quantized else None
    return CompressResult(weights, run.report, run.calib.describe() if run.calib else None, time.perf_counter() - t0,
                          bpw, run.notes, channel_scales=run.channel_scales, tuning=tuned)


def check_supported(model: Any, cfg: CompressConfig) -> ArchTraits:
    """Refuse (``ConfigError``) what the stage cannot do for this model; the architecture's traits otherwise."""
    if not cfg.compresses:
        raise ConfigError("nothing to compress: no quantization and no sparsity")
    if cfg.quantized and cfg.method is None:
        raise ConfigError("a quantized plan needs a method (the planner's rules choose one)")
    if model.kind != "decoder":
        raise ConfigError("weight quantization applies to decoders; encoders export in fp32 or fp16")
    traits = traits_for(model.model_type, model.config)
    if traits.conv1d and cfg.tune_epochs:
        raise ConfigError(f"end-to-end tuning of {model.model_type}'s Conv1D layers is not supported yet; "
                          "leave --tune-epochs at 0")
    return traits


def folding_note(cfg: CompressConfig, traits: ArchTraits, model_type: str) -> str | None:
    """What AWQ or SmoothQuant folded for this architecture (``ArchTraits.scale_groups``): the methods fold only
    where the float model's function is kept exactly, and round or smooth nothing more elsewhere."""
    if cfg.method not in FOLDING_METHODS:
        return None
    if not traits.folds_scales:
        return (f"{cfg.method}: no per-channel scales folded: no op in a {model_type} layer feeds only its "
                "linears (post-norms, fused or Conv1D layouts); the linears are rounded as they are")
    folds = "; ".join(f"{prev} -> {', '.join(r.rsplit('.', 1)[-1] for r in readers)}"
                      for prev, readers in traits.scale_groups)
    return f"{cfg.method}: per-channel scales folded into each layer's {folds}; other linears' inputs unscaled"


def start_run(model: Any, cfg: CompressConfig, traits: ArchTraits,
              progress: Callable[[str], None] | None) -> CompressRun:
    """A second module over the model's tensors, its group sizes checked, and the rotations (``rotate``)."""
    from slm_export.models.lazy import streamed_module
    from slm_export.models.loader import build_module

    # A second module over the same tensors: replacing its params is safe. A streamed model's is a skeleton whose
    # decoder layers read their weights when calibrated (``read_layer``) and drop them after; rounding without
    # data reads, rounds and drops one linear at a time (``quantize_without_data``).
    work = streamed_module(model, hook_layers=False) if streams(model, cfg) else build_module(model)
    transposed = linear_twins(work, traits) if traits.conv1d else set()
    if not cfg.w8a8:  # W8A8 weights are per channel or per tensor: no groups
        for name, lin in linear_names(work).items():
            check_group(lin.in_features, cfg.group_size, name)
    run = CompressRun(model, cfg, traits, work, dict(work.named_parameters()), progress, transposed=transposed)
    note = folding_note(cfg, traits, model.model_type)
    if note:
        run.notes.append(note)
    if cfg.rotate:
        run.rotations = rotate_down(work, cfg, rotate_weights=not cfg.needs_data)
        run.head_rotation = rotate_heads(work, model.config, cfg.seed)
    return run


def linear_twins(work: nn.Module, traits: ArchTraits) -> set[str]:
    """Replace each Conv1D in the decoder layers (GPT-2: ``y = x W + b``, W [in, out]) by an nn.Linear over the
    transposed weight, the same function, so that every quantizer sees the [out, in] layout; returns the weight
    names transposed (``assemble`` turns their float values back)."""
    from transformers.pytorch_utils import Conv1D

    names = set()
    for i, layer in enumerate(decoder_layers(work)):
        for name, m in list(layer.named_modules()):
            if not isinstance(m, Conv1D):
                continue
            lin = nn.Linear(*m.weight.shape, bias=m.bias is not None, device="meta")
            lin.weight = nn.Parameter(m.weight.detach().T.contiguous(), requires_grad=False)
            lin.bias = m.bias
            parent, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, attr, lin)
            names.add(f"{traits.layers}.{i}.{name}.weight")
    return names


def streams(model: Any, cfg: CompressConfig) -> bool:
    """Whether the stage reads a streamed model one layer at a time: nothing rotated (a rotation changes weights
    outside the linears), no end-to-end tuning (it runs the whole model at once) and no Conv1D (transposed twins
    of the module's weights); otherwise the whole float module is built."""
    return (model.streamed and not cfg.rotate and not cfg.tune_epochs
            and not traits_for(model.model_type, model.config).conv1d)


def read_layer(run: CompressRun, i: int, layer: nn.Module) -> None:
    """Give a streamed model's decoder layer ``i`` its float weights for its calibration step; the quantizer's
    ``done`` puts the meta ones back, so one layer is held at a time."""
    for name, _ in list(layer.named_parameters()):
        full = run.name(i, name)
        parent, _, attr = name.rpartition(".")
        p = nn.Parameter(torch.as_tensor(run.model.weights[full]), requires_grad=False)
        setattr(layer.get_submodule(parent) if parent else layer, attr, p)
        run.loaded[full] = weakref.ref(p)


def quantize_without_data(run: CompressRun) -> None:
    """No data: prune by magnitude, round to nearest, no forward passes. A streamed model's linears are read one
    at a time (the work module is a skeleton on the meta device)."""
    cfg = run.cfg
    finish = layer_quantizer(run).finish
    streamed = streams(run.model, cfg)
    for name, lin in linear_names(run.work).items():
        original = run.model.weights[name + ".weight"] if streamed else lin.weight.detach()
        w = prune(original, cfg.sparsity_config) if cfg.sparsity is not None else original
        q = finish(w, cfg, None, None)
        run.keep(name + ".weight", q)
        run.report.append(layer_entry(name, original, q, cfg, None))  # error against the weight as it came
        if streamed:  # the rounding's freed temporaries sit between the kept codes: give their pages back
            del original, w, q
            trim_heap()
    for name, p in run.work.named_parameters():  # e.g. v_proj's bias, rotated with its weight
        if p is not run.originals[name] and name not in run.quantized:
            run.changed[name] = p.detach()


def calibrate_layers(run: CompressRun) -> None:
    """Quantize layer by layer over the calibration set, each layer on the quantized outputs of the one before;
    the LM head's inputs are collected after the last."""
    cfg = run.cfg
    run.calib = calibration_set(run)
    batches = list(torch.from_numpy(run.calib.ids).split(8))
    quantizer = layer_quantizer(run)
    sequential_calibration(run.work, batches, quantizer.step, want_hessian=cfg.needs_hessian, after=quantizer.done,
                           final=partial(collect_head_inputs, run),
                           before=partial(read_layer, run) if streams(run.model, cfg) else None)


def calibration_set(run: CompressRun) -> CalibrationSet:
    cfg = run.cfg
    return load_calibration(run.model.tokenizer, cfg.calib_data, cfg.calib_samples, cfg.calib_seqlen, cfg.seed,
                            cfg.calib_holdout)


def assemble(run: CompressRun) -> dict[str, Any]:
    """The model's weights with the run's changed and quantized ones, the rotations' tensors, and their notes."""
    changes: dict[str, Any] = {**run.changed, **run.quantized}
    for name in run.transposed:  # float values (pruned only) back into Conv1D's [in, out]; codes stay [out, in]
        if isinstance(changes.get(name), torch.Tensor):
            changes[name] = changes[name].T.contiguous()
    # A streamed model's own weights stay in its files: the exporter reads the unchanged ones from there.
    weights: Any = Overlay(run.model.weights, changes) if run.model.streamed else {**run.model.weights, **changes}
    down = run.traits.down_proj
    for i, rot in run.rotations.items():
        weights[run.name(i, f"{down}.rotation.signs")] = rot.signs
        weights[run.name(i, f"{down}.rotation.block")] = rot.block
    if run.cfg.rotate and not run.rotations and down is None:
        run.notes.append(f"MLP output projection's inputs not rotated: the {run.model.model_type} export has no "
                         "online rotation for it yet")
    elif run.cfg.rotate and not run.rotations:
        run.notes.append("down_proj inputs not rotated: no power-of-two block of 16 or more channels divides them")
    if run.rotations:
        b = next(iter(run.rotations.values())).block.shape[0]
        run.notes.append(f"down_proj inputs rotated online by a randomised block Hadamard (block {b}); "
                         "its weights hold the matching rotation")
    if run.head_rotation:
        run.notes.append(f"attention heads rotated offline by a randomised Hadamard of order {run.head_rotation} "
                         "(v_proj rows and o_proj columns; no extra op)")
    return weights


def tune(run: CompressRun, weights: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """End-to-end tuning (``tune.py``) of the quantized weights on the calibration samples, with its note."""
    cfg = run.cfg
    if run.calib is None:  # round-to-nearest read no data so far
        run.calib = calibration_set(run)
    weights, tuned = tune_end_to_end(run.model, weights, run.calib.ids, cfg.tune_epochs, cfg.seed, run.progress)
    run.notes.append(f"tuned end to end: {tuned['steps']} steps ({cfg.tune_epochs} passes over the calibration "
                     f"samples) fitted {tuned['norm_tensors']} norm weight vectors and {tuned['scales']} group "
                     "scales (codes, zero points and signs fixed) to the float model's next-token distributions; "
                     f"calibration KL {tuned['calibration_kl_first_quarter']:.4f} in the first quarter of the "
                     f"steps, {tuned['calibration_kl_last_quarter']:.4f} in the last (the per-layer SQNR "
                     "figures are from before tuning)")
    return weights, tuned
