"""The compress stage: weight quantization chosen by the plan, run layer by layer.

Returns a weights mapping for the exporter (Hugging Face names -> float arrays or QuantizedTensor),
with per-layer SQNR of weights and (when calibration data is used) of the layer outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from slm_export.calibration.awq import AWQConfig, awq_quantize, search_scale
from slm_export.calibration.data import CalibrationSet, load_calibration
from slm_export.calibration.gptq import GPTQConfig, gptq_quantize, prepare_hessian
from slm_export.calibration.quant import QuantizedTensor, check_group, quantize_rtn, sqnr_db
from slm_export.calibration.sequential import InputStats, decoder_layers, sequential_calibration
from slm_export.errors import ConfigError
from slm_export.sparsity import SparsityConfig, prune, sparsity_of

METHODS = ("rtn", "gptq", "awq")
BITS = {"int8": 8, "int4": 4, "int3": 3, "none": 0}
AWQ_TYPES = ("llama", "mistral", "qwen2", "gemma")


@dataclass(frozen=True)
class CompressConfig:
    """Weight-only quantization settings; validated on construction."""

    precision: str = "int4"
    method: str = "gptq"
    group_size: int = 32
    symmetric: bool = False
    calib_data: str | None = None
    calib_samples: int = 128
    calib_seqlen: int = 512
    seed: int = 0
    damp: float = 0.01
    act_order: bool = True
    lm_head_bits: int = 0  # 0: keep the (tied) LM head in float
    sparsity: SparsityConfig | None = None

    def __post_init__(self) -> None:
        if self.precision == "none" and self.sparsity is None:
            raise ConfigError("nothing to compress: no quantization and no sparsity")
        if self.precision not in BITS:
            raise ConfigError(f"weight-only precision must be one of {', '.join(BITS)}, not {self.precision!r}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; methods: {', '.join(METHODS)}")
        if self.group_size < 16 or self.group_size & (self.group_size - 1):
            raise ConfigError(f"group size must be a power of two >= 16 (what MatMulNBits runs), not {self.group_size}")
        if self.lm_head_bits not in (0, 4, 8):
            raise ConfigError("LM head bits must be 0 (float), 4 or 8")

    @property
    def bits(self) -> int:
        return BITS[self.precision]

    @property
    def needs_data(self) -> bool:
        quant = self.precision != "none" and self.method != "rtn"
        return quant or (self.sparsity is not None and self.sparsity.needs_data)

    @property
    def needs_hessian(self) -> bool:
        quant = self.precision != "none" and self.method == "gptq"
        return quant or (self.sparsity is not None and self.sparsity.method == "sparsegpt")


@dataclass(frozen=True)
class CompressResult:
    weights: dict[str, Any]
    layers: list[dict[str, Any]]
    calibration: dict[str, Any] | None
    seconds: float
    bits_per_weight: float | None
    notes: list[str] = field(default_factory=list)
    budget: dict[str, Any] | None = None


def _linear_names(module: nn.Module) -> dict[str, nn.Linear]:
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
    from slm_export.models.loader import _build_module

    if model.kind != "decoder":
        raise ConfigError("weight quantization applies to decoders; encoders export in fp32 or fp16")
    if model.model_type == "gpt2":
        raise ConfigError("int8/int4 for gpt2 (Conv1D layers) is not supported yet; use fp32 or fp16")
    if cfg.method == "awq" and model.model_type not in AWQ_TYPES:
        raise ConfigError(f"AWQ scale folding supports {', '.join(AWQ_TYPES)}; use --method gptq or rtn")
    t0 = time.perf_counter()
    work = _build_module(model)  # a second module over the same tensors: replacing its params is safe
    linears = _linear_names(work)
    for name, lin in linears.items():
        check_group(lin.in_features, cfg.group_size, name)
    calib: CalibrationSet | None = None
    quantized: dict[str, QuantizedTensor] = {}
    layer_report: list[dict[str, Any]] = []
    originals = {name: p for name, p in work.named_parameters()}
    changed: dict[str, torch.Tensor] = {}
    if not cfg.needs_data:
        for name, lin in linears.items():  # no data: prune by magnitude, round to nearest, no forward passes
            w = lin.weight.detach()
            if cfg.sparsity is not None:
                w = prune(w, cfg.sparsity)
            q = _finish_weight(w, cfg, None, None)
            quantized[name + ".weight"] = q
            layer_report.append(_layer_entry(name, lin.weight.detach(), q, cfg, None))
    else:
        calib = load_calibration(model.tokenizer, cfg.calib_data, cfg.calib_samples, cfg.calib_seqlen, cfg.seed)
        ids = torch.from_numpy(calib.ids)
        batches = list(ids.split(8))
        prefix = "model.layers" if hasattr(work, "model") else "transformer.h"

        def step(i: int, layer: nn.Module, stats: dict[str, InputStats]) -> None:
            prepared: dict[int, Any] = {}
            if cfg.method == "awq":
                _awq_layer(layer, stats, cfg, model.model_type)
            for name, lin in layer.named_modules():
                if not isinstance(lin, nn.Linear):
                    continue
                full = f"{prefix}.{i}.{name}"
                w = lin.weight.detach()
                st = stats[name]
                if cfg.sparsity is not None:
                    hess = None
                    if cfg.sparsity.method == "sparsegpt":
                        key = ("sparse", id(st))
                        if key not in prepared:
                            prepared[key] = prepare_hessian(st.hessian, GPTQConfig(damp=cfg.damp, act_order=False))  # type: ignore[arg-type]
                        hess = prepared[key]
                    w = prune(w, cfg.sparsity, st.sq_sum, hess)
                q = _finish_weight(w, cfg, st, prepared)
                quantized[full + ".weight"] = q
                layer_report.append(_layer_entry(full, originals[full + ".weight"].detach(), q, cfg, st))
                deq = q.dequantize() if isinstance(q, QuantizedTensor) else q.numpy()
                lin.weight = nn.Parameter(torch.from_numpy(deq), requires_grad=False)
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

        sequential_calibration(work, batches, step, want_hessian=cfg.needs_hessian, after=done)
    weights: dict[str, Any] = dict(model.weights)
    weights.update(changed)
    weights.update(quantized)
    notes = []
    if cfg.lm_head_bits:
        head = weights.get("lm_head.weight", model.weights["model.embed_tokens.weight"])
        weights["lm_head.weight"] = quantize_rtn(head, cfg.lm_head_bits, cfg.group_size, False)
        notes.append(f"LM head quantized to int{cfg.lm_head_bits} (round-to-nearest, group {cfg.group_size})")
    # Only meaningful when weights are quantized: pruned float weights are stored dense at the artifact's
    # float width, which the compress stage does not decide.
    bpw = _bits_per_weight(weights) if cfg.precision != "none" else None
    return CompressResult(weights, layer_report, calib.describe() if calib else None, time.perf_counter() - t0,
                          bpw, notes)


def _finish_weight(w: torch.Tensor, cfg: CompressConfig, st: InputStats | None,
                   prepared: dict[Any, Any] | None) -> QuantizedTensor | torch.Tensor:
    """Quantize a (possibly pruned) weight by the configured method; float when only pruning."""
    if cfg.precision == "none":
        return w
    keep = (w != 0) if cfg.sparsity is not None else None
    if cfg.method == "rtn" or st is None:
        return quantize_rtn(w, cfg.bits, cfg.group_size, cfg.symmetric)  # exact zeros stay zero
    if cfg.method == "gptq":
        gcfg = GPTQConfig(cfg.bits, cfg.group_size, cfg.symmetric, cfg.damp, cfg.act_order)
        key = ("gptq", id(st))
        if prepared is not None and key not in prepared:  # q/k/v (and gate/up) share one input: factor once
            prepared[key] = prepare_hessian(st.hessian, gcfg)  # type: ignore[arg-type]
        return gptq_quantize(w, prepared[key] if prepared is not None else st.hessian, gcfg, keep)  # type: ignore[arg-type]
    return awq_quantize(w, torch.cat(st.sample), AWQConfig(cfg.bits, cfg.group_size, cfg.symmetric))


def _layer_entry(name: str, w: torch.Tensor, q: QuantizedTensor | torch.Tensor, cfg: CompressConfig,
                 stats: InputStats | None) -> dict[str, Any]:
    ref = w.float().numpy()
    deq = q.dequantize() if isinstance(q, QuantizedTensor) else q.numpy()
    bits = q.bits if isinstance(q, QuantizedTensor) else 32
    entry = {"layer": name, "method": cfg.method if cfg.precision != "none" else "float", "bits": bits,
             "group": q.group if isinstance(q, QuantizedTensor) else 0, "weight_sqnr_db": round(_sqnr32(ref, deq), 2)}
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


def _awq_layer(layer: nn.Module, stats: dict[str, InputStats], cfg: CompressConfig, model_type: str) -> None:
    """Search and fold AWQ scales for the three input-sharing groups of a Llama-family layer."""
    acfg = AWQConfig(cfg.bits, cfg.group_size, cfg.symmetric)
    attn, mlp = layer.self_attn, layer.mlp
    offset = 1.0 if model_type == "gemma" else 0.0
    groups = [
        (layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], "self_attn.q_proj"),
        (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], "mlp.gate_proj"),
        (mlp.up_proj, [mlp.down_proj], "mlp.down_proj"),
    ]
    for prev, lins, key in groups:
        st = stats[key]
        x = torch.cat(st.sample)
        s = search_scale([m.weight.detach() for m in lins], x, st.abs_mean, acfg)  # type: ignore[arg-type]
        for m in lins:
            m.weight = nn.Parameter(m.weight.detach() * s, requires_grad=False)
        if isinstance(prev, nn.Linear):  # fold 1/s into the rows of the producing linear
            prev.weight = nn.Parameter(prev.weight.detach() / s.unsqueeze(1), requires_grad=False)
        else:  # RMSNorm: y = norm(x) * (w + offset)
            new = (prev.weight.detach() + offset) / s - offset
            prev.weight = nn.Parameter(new, requires_grad=False)
        st.sample = [x / s for x in st.sample]  # the linears now read x / s (siblings share ``st``)
