"""The compress stage: weight quantization chosen by the plan, run layer by layer.

Returns a weights mapping for the exporter (Hugging Face names -> float arrays or QuantizedTensor),
with per-layer SQNR of weights and (when calibration data is used) of the layer outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from slm_export.calibration.awq import AWQConfig, awq_quantize
from slm_export.calibration.config import CompressConfig
from slm_export.calibration.data import CalibrationSet, load_calibration
from slm_export.calibration.gptq import GPTQConfig, gptq_quantize, prepare_hessian
from slm_export.calibration.observers import fake_quant, make_observer
from slm_export.calibration.quant import HotRowsTensor, QuantizedTensor, check_group, quantize_rtn, sqnr_db
from slm_export.calibration.sequential import InputStats, decoder_layers, observe_inputs, sequential_calibration
from slm_export.calibration.smoothquant import pow2_weight_scale, quantize_weight
from slm_export.calibration.transforms import (
    apply_rotation,
    awq_head,
    awq_layer,
    rotate_down,
    rotate_heads,
    smooth_layer,
)
from slm_export.calibration.tune import TuneConfig, tune_end_to_end
from slm_export.errors import ConfigError
from slm_export.sparsity import prune, sparsity_of

__all__ = ["CompressConfig", "CompressResult", "compress"]

AWQ_TYPES = ("llama", "mistral", "qwen2", "gemma")



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
    channel_scales: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = field(default_factory=dict)
    tuning: dict[str, Any] | None = None  # end-to-end tuning's summary (``tune.py``), when it ran


def linear_names(module: nn.Module) -> dict[str, nn.Linear]:
    """Every linear inside the decoder layers, by its full parameter prefix."""
    out = {}
    layers = decoder_layers(module)
    prefix = "model.layers" if hasattr(module, "model") else "transformer.h"
    for i, layer in enumerate(layers):
        for name, m in layer.named_modules():
            if isinstance(m, nn.Linear):
                out[f"{prefix}.{i}.{name}"] = m
    return out


def compress(model: Any, cfg: CompressConfig, progress: Callable[[str], None] | None = None) -> CompressResult:
    """Quantize ``model``'s decoder linears per ``cfg``; the model's own weights are left untouched."""
    from slm_export.models.loader import build_module

    if not cfg.compresses:
        raise ConfigError("nothing to compress: no quantization and no sparsity")
    if cfg.quantized and cfg.method is None:
        raise ConfigError("a quantized plan needs a method (the planner's rules choose one)")
    if model.kind != "decoder":
        raise ConfigError("weight quantization applies to decoders; encoders export in fp32 or fp16")
    if model.model_type == "gpt2":
        raise ConfigError("int8/int4 for gpt2 (Conv1D layers) is not supported yet; use fp32 or fp16")
    if cfg.method in ("awq", "awq-gptq", "smoothquant") and model.model_type not in AWQ_TYPES:
        raise ConfigError(f"{cfg.method} folds scales into the norms of {', '.join(AWQ_TYPES)} layers only; "
                          "use --method gptq, rtn or dynamic")
    t0 = time.perf_counter()
    work = build_module(model)  # a second module over the same tensors: replacing its params is safe
    linears = linear_names(work)
    if not cfg.w8a8:  # W8A8 weights are per channel or per tensor: no groups
        for name, lin in linears.items():
            check_group(lin.in_features, cfg.group_size, name)
    calib: CalibrationSet | None = None
    quantized: dict[str, QuantizedTensor] = {}
    layer_report: list[dict[str, Any]] = []
    originals = {name: p for name, p in work.named_parameters()}
    changed: dict[str, torch.Tensor] = {}
    prefix = "model.layers" if hasattr(work, "model") else "transformer.h"
    head_stats: list[InputStats] = []  # the LM head's input statistics, when calibration runs
    channel_scales: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
    row_mass: list[np.ndarray] = []  # --lm-head-hot: the float head's probability of each row over those inputs
    rotations = rotate_down(work, cfg, rotate_weights=not cfg.needs_data) if cfg.rotate else {}
    head_rotation = rotate_heads(work, model.config, cfg.seed) if cfg.rotate else None
    if not cfg.needs_data:
        for name, lin in linears.items():  # no data: prune by magnitude, round to nearest, no forward passes
            w = lin.weight.detach()
            if cfg.sparsity is not None:
                w = prune(w, cfg.sparsity_config)
            q = _finish_weight(w, cfg, None, None)
            quantized[name + ".weight"] = q
            layer_report.append(_layer_entry(name, lin.weight.detach(), q, cfg, None))
        for name, p in work.named_parameters():  # e.g. v_proj's bias, rotated with its weight
            if p is not originals[name] and name not in quantized:
                changed[name] = p.detach()
    else:
        calib = load_calibration(model.tokenizer, cfg.calib_data, cfg.calib_samples, cfg.calib_seqlen, cfg.seed,
                                 cfg.calib_holdout)
        ids = torch.from_numpy(calib.ids)
        batches = list(ids.split(8))

        act_hooks: list[Any] = []

        def step(i: int, layer: nn.Module, stats: dict[str, InputStats], inputs: list) -> None:
            prepared: dict[int, Any] = {}
            alphas: dict[str, float | None] = {}
            if cfg.method in ("awq", "awq-gptq"):
                channel_scales.update(awq_layer(layer, stats, cfg, model.model_type, f"{prefix}.{i}"))
            elif cfg.method == "smoothquant":
                alphas = smooth_layer(layer, stats, cfg, model.model_type, rotations.get(i))
            if i in rotations:
                act_hooks.append(apply_rotation(layer, rotations[i], stats["mlp.down_proj"]))
            for name, lin in layer.named_modules():
                if not isinstance(lin, nn.Linear):
                    continue
                full = f"{prefix}.{i}.{name}"
                w = ref = lin.weight.detach()  # after any smoothing or rotation, before pruning
                st = stats[name]
                if cfg.sparsity is not None:
                    hess = None
                    if cfg.sparsity_method == "sparsegpt":
                        key = ("sparse", id(st))
                        if key not in prepared:
                            prepared[key] = prepare_hessian(st.hessian, GPTQConfig(damp=cfg.damp, act_order=False))  # type: ignore[arg-type]
                        hess = prepared[key]
                    w = prune(w, cfg.sparsity_config, st.sq_sum, hess)
                q = _finish_weight(w, cfg, st, prepared)
                quantized[full + ".weight"] = q
                layer_report.append(_layer_entry(full, ref, q, cfg, st))
                deq = q.dequantize() if isinstance(q, QuantizedTensor) else q.numpy()
                lin.weight = nn.Parameter(torch.from_numpy(deq), requires_grad=False)
            if cfg.method == "smoothquant":  # activation ranges of the smoothed, weight-quantized layer
                act_hooks.extend(_calibrate_activations(layer, inputs, cfg, f"{prefix}.{i}", quantized,
                                                        layer_report, alphas, stats))
            if progress:
                progress(f"layer {i + 1}/{len(decoder_layers(work))}")

        def done(i: int, layer: nn.Module) -> None:
            """Layer ``i``'s outputs exist: keep the float params an algorithm changed (AWQ's folded
            norms), then put the original tensors back so dequantized copies do not pile up."""
            for name, p in layer.named_parameters():
                full = f"{prefix}.{i}.{name}"
                if p is not originals[full] and full not in quantized:
                    changed[full] = p.detach()
            for name, _ in list(layer.named_parameters()):
                parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
                setattr(parent, name.rpartition(".")[2], originals[f"{prefix}.{i}.{name}"])
            for h in act_hooks:
                h.remove()
            act_hooks.clear()

        def head_inputs(hidden: list) -> None:
            """What the LM head reads over the calibration set (final norm of the quantized stack)."""
            norm = getattr(getattr(work, "model", None), "norm", None)
            if not cfg.lm_head_bits or cfg.w8a8 or norm is None:
                return
            st = InputStats()
            table = _float_head(model) if cfg.lm_head_hot else None
            with torch.no_grad():
                for h, _ in hidden:
                    x = norm(h)
                    st.update(x, cfg.needs_hessian, 2048)
                    if table is not None:
                        row_mass.append(_probability_mass(x, table))
            head_stats.append(st.finish())

        sequential_calibration(work, batches, step, want_hessian=cfg.needs_hessian, after=done, final=head_inputs)
    weights: dict[str, Any] = dict(model.weights)
    weights.update(changed)
    weights.update(quantized)
    notes = []
    for i, rot in rotations.items():
        weights[f"{prefix}.{i}.mlp.down_proj.rotation.signs"] = rot.signs
        weights[f"{prefix}.{i}.mlp.down_proj.rotation.block"] = rot.block
    if cfg.rotate and not rotations:
        notes.append("down_proj inputs not rotated: no power-of-two block of 16 or more channels divides them")
    if rotations:
        b = next(iter(rotations.values())).block.shape[0]
        notes.append(f"down_proj inputs rotated online by a randomised block Hadamard (block {b}); "
                     "its weights hold the matching rotation")
    if head_rotation:
        notes.append(f"attention heads rotated offline by a randomised Hadamard of order {head_rotation} "
                     "(v_proj rows and o_proj columns; no extra op)")
    if cfg.lm_head_bits:
        head = _float_head(model)
        st = head_stats[0] if head_stats else None
        if st is not None and st.sample and cfg.method in ("awq", "awq-gptq") and "model.norm.weight" in weights:
            head, norm_w, s = awq_head(head, st, cfg, weights["model.norm.weight"], model.model_type)
            weights["model.norm.weight"] = norm_w
            channel_scales["lm_head.weight"] = (s, None)
        q, how = _quantize_head(head, cfg, st)
        notes.append(f"LM head quantized to int{cfg.lm_head_bits} ({how}, group {cfg.group_size})")
        if cfg.lm_head_hot and calib is not None:
            # A logit's error moves the loss by (p - y) times it: a row matters as often as it is the next
            # token (y) and by the probability the head gives it (p). So rows rank by the calibration
            # text's next tokens plus the float head's probability mass over the same positions.
            tokens = np.bincount(calib.ids[:, 1:].reshape(-1), minlength=head.shape[0])[:head.shape[0]]
            rows = hot_rows(tokens + sum(row_mass, np.zeros(head.shape[0])), cfg.lm_head_hot)
            if rows.size:
                hot, _ = _quantize_head(head[torch.from_numpy(rows)], replace(cfg, lm_head_bits=8, lm_head_hot=0.0),
                                        st)
                q = HotRowsTensor(q.codes, q.scales, q.zeros, q.bits, q.group, rows=rows, hot=hot)
                share = rows.size / head.shape[0]
                notes.append(f"LM head: the {rows.size} rows the calibration text reads most ({share:.1%} "
                             f"of the vocabulary, {tokens[rows].sum() / max(tokens.sum(), 1):.1%} of its tokens) kept "
                             "at int8 too; the graph writes their int8 logits over the int4 ones")
        weights["lm_head.weight"] = q
        layer_report.append(_layer_entry("lm_head", head, q, cfg, st))
    tuned = None
    if cfg.tune_epochs:
        if calib is None:  # round-to-nearest read no data so far
            calib = load_calibration(model.tokenizer, cfg.calib_data, cfg.calib_samples, cfg.calib_seqlen, cfg.seed,
                                     cfg.calib_holdout)
        weights, tuned = tune_end_to_end(model, weights, calib.ids, TuneConfig(cfg.tune_epochs, seed=cfg.seed),
                                         progress)
        notes.append(f"tuned end to end: {tuned['steps']} steps ({cfg.tune_epochs} passes over the calibration "
                     f"samples) fitted {tuned['norm_tensors']} norm weight vectors and {tuned['scales']} group scales "
                     "(codes, zero points and signs fixed) to the float model's next-token distributions; "
                     f"calibration KL {tuned['calibration_kl_first_quarter']:.4f} in the first quarter of the "
                     f"steps, {tuned['calibration_kl_last_quarter']:.4f} in the last (the per-layer SQNR "
                     "figures are from before tuning)")
    # Only meaningful when weights are quantized: pruned float weights are stored dense at the artifact's
    # float width, which the compress stage does not decide.
    bpw = _bits_per_weight(weights) if cfg.quantized else None
    return CompressResult(weights, layer_report, calib.describe() if calib else None, time.perf_counter() - t0,
                          bpw, notes, channel_scales=channel_scales, tuning=tuned)


def _float_head(model: Any) -> torch.Tensor:
    """The LM head's float table ([vocab, hidden]): its own weight, or the embedding it is tied to."""
    w = model.weights.get("lm_head.weight", model.weights["model.embed_tokens.weight"])
    return torch.as_tensor(np.asarray(w, dtype=np.float32))


def _probability_mass(x: torch.Tensor, table: torch.Tensor, every: int = 4, chunk: int = 512) -> np.ndarray:
    """Each row's summed softmax probability under the float head over every ``every``-th position of ``x``
    (the head's inputs), times ``every``."""
    flat = x.reshape(-1, x.shape[-1])[::every]
    mass = sum(torch.softmax(flat[i:i + chunk] @ table.T, -1).sum(0) for i in range(0, flat.shape[0], chunk))
    return mass.double().numpy() * every  # type: ignore[union-attr]


def hot_rows(counts: np.ndarray, fraction: float) -> np.ndarray:
    """The ``fraction`` of rows with the highest counts (never a row counted zero), ascending."""
    k = min(int(np.ceil(fraction * counts.size)), int((counts > 0).sum()))
    return np.sort(np.argsort(-counts, kind="stable")[:k]).astype(np.int64)


def _quantize_head(w: torch.Tensor, cfg: CompressConfig, st: InputStats | None) -> tuple[QuantizedTensor, str]:
    """The LM head at ``cfg.lm_head_bits``: GPTQ on the Hessian of its calibration inputs when the
    method computes Hessians, AWQ's clip search on a sample of them for AWQ, else round-to-nearest.

    A tied head is quantized as its own tensor; the embedding keeps the float table."""
    if st is not None and st.hessian is not None:
        return gptq_quantize(w, st.hessian, GPTQConfig(cfg.lm_head_bits, cfg.group_size, cfg.symmetric, cfg.damp,
                                                       cfg.act_order, signed=cfg.signed_scales)), \
            "GPTQ on its calibration inputs"
    if st is not None and st.sample and cfg.method == "awq":
        return (awq_quantize(w, torch.cat(st.sample), AWQConfig(cfg.lm_head_bits, cfg.group_size, cfg.symmetric,
                                                                  signed=cfg.signed_scales)),
                "clip search on its calibration inputs")
    return quantize_rtn(w, cfg.lm_head_bits, cfg.group_size, cfg.symmetric, signed=cfg.signed_scales), \
        "round-to-nearest"


def _finish_weight(w: torch.Tensor, cfg: CompressConfig, st: InputStats | None,
                   prepared: dict[Any, Any] | None) -> QuantizedTensor | torch.Tensor:
    """Quantize a (possibly pruned) weight by the configured method; float when only pruning."""
    if not cfg.quantized:
        return w
    keep = (w != 0) if cfg.sparsity is not None else None
    if cfg.w8a8:  # int8 weights; smoothquant sets the activation scale after observing the inputs
        if st is not None and st.hessian is not None and prepared is not None:
            gcfg = GPTQConfig(8, w.shape[1], True, cfg.damp, cfg.act_order)
            key = ("gptq8", id(st))
            if key not in prepared:
                prepared[key] = prepare_hessian(st.hessian, gcfg)
            grid = torch.tensor([[pow2_weight_scale(w, st.hessian)]]) if cfg.pow2_scales else None
            return gptq_quantize(w, prepared[key], gcfg, keep, scale=grid)
        q = quantize_weight(w, cfg.pow2_scales)
        return replace(q, act_dynamic=True) if cfg.method == "dynamic" else q
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


def _layer_entry(name: str, w: torch.Tensor, q: QuantizedTensor | torch.Tensor, cfg: CompressConfig,
                 stats: InputStats | None) -> dict[str, Any]:
    ref = w.float().numpy()
    deq = q.dequantize() if isinstance(q, QuantizedTensor) else q.numpy()
    bits = q.bits if isinstance(q, QuantizedTensor) else 32
    entry = {"layer": name, "method": cfg.method if cfg.quantized else "float", "bits": bits,
             "group": q.group if isinstance(q, QuantizedTensor) else 0, "weight_sqnr_db": round(_sqnr32(ref, deq), 2)}
    if cfg.w8a8:
        entry["group"] = "tensor" if cfg.pow2_scales else "channel"
    if isinstance(q, HotRowsTensor):
        entry["hot_rows"], entry["hot_bits"] = len(q.rows), q.hot.bits  # type: ignore[arg-type, union-attr]
    if cfg.sparsity is not None:
        entry["sparsity"] = round(sparsity_of(deq != 0), 4)
    if stats is not None and stats.hessian is not None:
        # Output SQNR over the calibration inputs from the Hessian: ||XW^T||^2 = tr(W H W^T).
        H = stats.hessian
        r = torch.from_numpy(ref)
        d = r - torch.from_numpy(deq)
        signal, noise = float(((r @ H) * r).sum()), float(((d @ H) * d).sum())
        entry["output_sqnr_db"] = round(float(10 * np.log10(signal / max(noise, 1e-30))), 2)
    elif stats is not None and stats.sample:
        x = torch.cat(stats.sample)
        ref_out, q_out = x @ torch.from_numpy(ref).T, x @ torch.from_numpy(deq).T
        entry["output_sqnr_db"] = round(sqnr_db(ref_out.numpy(), q_out.numpy()), 2)
    return entry


def _sqnr32(ref: np.ndarray, approx: np.ndarray) -> float:
    r = torch.from_numpy(ref)
    return float(10 * torch.log10((r * r).sum() / ((r - torch.from_numpy(approx)) ** 2).sum().clamp_min(1e-30)))


def _bits_per_weight(weights: dict[str, Any]) -> float:
    """Mean stored bits per weight over the linear layers and the LM head (scales and zeros included)."""
    bits, count = 0.0, 0
    for name, w in weights.items():
        if isinstance(w, QuantizedTensor):
            bits += w.storage_bytes() * 8
            count += w.size
        elif name.endswith("proj.weight"):
            bits += w.numel() * 32
            count += w.numel()
    return bits / max(count, 1)


def _calibrate_activations(layer: nn.Module, inputs: list, cfg: CompressConfig, prefix: str,
                           quantized: dict[str, QuantizedTensor], report: list[dict[str, Any]],
                           alphas: dict[str, float | None], stats: dict[str, InputStats]) -> list[Any]:
    """Observe each linear's (smoothed) input over the calibration set, give its quantized weight the
    static activation scale, and hook the layer so that its outputs (the next layer's calibration inputs)
    carry the int8 activation error the runtime will have. Returns the hooks to remove."""
    observers = observe_inputs(layer, inputs, lambda: make_observer(cfg.observer))
    entries = {e["layer"]: e for e in report}
    hooks = []
    for name, lin in layer.named_modules():
        if not isinstance(lin, nn.Linear):
            continue
        full = f"{prefix}.{name}"
        scale = float(observers[name].scale(8, pow2=cfg.pow2_scales))
        quantized[full + ".weight"] = replace(quantized[full + ".weight"], act_scale=scale)
        x = torch.cat(stats[name].sample)  # smoothed rows of this input
        act_sqnr = sqnr_db(x.numpy(), fake_quant(x, scale).numpy())
        entries[full].update(act_scale=scale, act_observer=cfg.observer, smooth_alpha=alphas.get(name, "none"),
                             act_sqnr_db=round(act_sqnr, 2))
        hooks.append(lin.register_forward_pre_hook(lambda mod, args, s=scale: (fake_quant(args[0], s),)))
    return hooks
