"""The LM head in the compress stage (``lm_head_bits``): its calibration inputs (the final norm of the quantized
stack), AWQ's scales folded into that norm (or OPT's project_out), its quantization, and (``lm_head_hot``) the
rows kept at int8 too.

A tied head is quantized as its own tensor; the embedding keeps the float table.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from slm_export.calibration.awq import AWQConfig, awq_quantize
from slm_export.calibration.config import CompressConfig
from slm_export.calibration.gptq import GPTQConfig, gptq_quantize
from slm_export.calibration.quant import HotRowsTensor, PackedQuantized, QuantizedTensor, quantize_rtn
from slm_export.calibration.run import CompressRun, layer_entry
from slm_export.calibration.sequential import InputStats, submodule
from slm_export.calibration.transforms import awq_head, fold_into_norm
from slm_export.models.traits import ArchTraits

HEAD_SAMPLE_ROWS = 2048  # rows of the head's inputs kept for AWQ's searches


def float_head(model: Any, traits: ArchTraits) -> torch.Tensor:
    """The LM head's float table ([vocab, hidden]): its own weight, or the embedding it is tied to."""
    w = model.weights.get(traits.lm_head, model.weights[traits.embed])
    return torch.as_tensor(np.asarray(w, dtype=np.float32))


def probability_mass(x: torch.Tensor, table: torch.Tensor, every: int = 4, chunk: int = 512) -> np.ndarray:
    """Each row's summed softmax probability under the float head over every ``every``-th position of ``x``
    (the head's inputs), times ``every``."""
    flat = x.reshape(-1, x.shape[-1])[::every]
    mass = sum(torch.softmax(flat[i:i + chunk] @ table.T, -1).sum(0) for i in range(0, flat.shape[0], chunk))
    return mass.double().numpy() * every  # type: ignore[union-attr]


def hot_rows(counts: np.ndarray, fraction: float) -> np.ndarray:
    """The ``fraction`` of rows with the highest counts (never a row counted zero), ascending."""
    k = min(int(np.ceil(fraction * counts.size)), int((counts > 0).sum()))
    return np.sort(np.argsort(-counts, kind="stable")[:k]).astype(np.int64)


def fold_head_scale(weights: dict[str, Any], producer: tuple[str, bool], s: torch.Tensor, offset: float) -> None:
    """Divide the output of the head's producer by ``s`` in ``weights``: a linear's rows, or a norm's weight
    (``fold_into_norm``), and either one's bias."""
    prefix, linear = producer
    w = torch.as_tensor(np.asarray(weights[prefix + ".weight"], dtype=np.float32))
    weights[prefix + ".weight"] = w / s[:, None] if linear else fold_into_norm(w, s, offset)
    if prefix + ".bias" in weights:
        weights[prefix + ".bias"] = torch.as_tensor(np.asarray(weights[prefix + ".bias"], dtype=np.float32)) / s


def collect_head_inputs(run: CompressRun, hidden: list) -> None:
    """What the LM head reads over the calibration set (the quantized stack's outputs ``hidden`` through the
    final norm and OPT's project_out, where present), into ``run.head_stats``; ``lm_head_hot`` also sums the float
    head's row probabilities."""
    cfg = run.cfg
    if not cfg.lm_head_bits or cfg.w8a8:
        return
    tail = [m for m in (submodule(run.work, run.traits.final_norm), submodule(run.work, run.traits.head_proj))
            if m is not None]
    st = InputStats()
    table = float_head(run.model, run.traits) if cfg.lm_head_hot else None
    with torch.no_grad():
        for h, _ in hidden:
            x = h
            for m in tail:
                x = m(x)
            st.update(x, cfg.needs_hessian, HEAD_SAMPLE_ROWS)
            if table is not None:
                run.row_mass.append(probability_mass(x, table))
    run.head_stats = st.finish()


def quantize_head(w: torch.Tensor, cfg: CompressConfig, st: InputStats | None,
                  bits: int) -> tuple[QuantizedTensor, str]:
    """The LM head at ``bits``: GPTQ on the Hessian of its calibration inputs when the method computes
    Hessians, AWQ's clip search on a sample of them for AWQ, else round-to-nearest."""
    if st is not None and st.hessian is not None:
        return gptq_quantize(w, st.hessian, GPTQConfig(bits, cfg.group_size, cfg.symmetric, cfg.damp,
                                                       cfg.act_order, signed=cfg.signed_scales)), \
            "GPTQ on its calibration inputs"
    if st is not None and st.sample and cfg.method == "awq":
        return (awq_quantize(w, torch.cat(st.sample), AWQConfig(bits, cfg.group_size, cfg.symmetric,
                                                                  signed=cfg.signed_scales)),
                "clip search on its calibration inputs")
    return quantize_rtn(w, bits, cfg.group_size, cfg.symmetric, signed=cfg.signed_scales), "round-to-nearest"


def quantize_lm_head(run: CompressRun, weights: dict[str, Any]) -> None:
    """Quantize the LM head into ``weights`` (AWQ: its scales folded into the final norm there too), with its
    report entry and notes in ``run``."""
    cfg, traits = run.cfg, run.traits
    head = float_head(run.model, traits)
    st = run.head_stats
    producer = traits.head_producer(weights)
    if st is not None and st.sample and cfg.method in ("awq", "awq-gptq") and producer is not None:
        head, s = awq_head(head, st, cfg)
        fold_head_scale(weights, producer, s, traits.norm_offset)
        run.channel_scales[traits.lm_head] = (s, None)
    q, how = quantize_head(head, cfg, st, cfg.lm_head_bits)
    run.notes.append(f"LM head quantized to int{cfg.lm_head_bits} ({how}, group {cfg.group_size})")
    if cfg.lm_head_hot and run.calib is not None:
        q = _with_hot_rows(run, head, q, st)
    weights[traits.lm_head] = PackedQuantized.of(q) if run.model.streamed else q  # as ``CompressRun.keep``
    run.report.append(layer_entry(traits.lm_head.removesuffix(".weight"), head, q, cfg, st))


def _with_hot_rows(run: CompressRun, head: torch.Tensor, q: QuantizedTensor, st: InputStats | None) -> QuantizedTensor:
    """``q`` with the rows the calibration text reads most kept at int8 too (``lm_head_hot``).

    A logit's error moves the loss by (p - y) times it: a row matters as often as it is the next token (y)
    and by the probability the head gives it (p). So rows rank by the calibration text's next tokens plus
    the float head's probability mass over the same positions."""
    ids = run.calib.ids  # type: ignore[union-attr]
    tokens = np.bincount(ids[:, 1:].reshape(-1), minlength=head.shape[0])[:head.shape[0]]
    rows = hot_rows(tokens + sum(run.row_mass, np.zeros(head.shape[0])), run.cfg.lm_head_hot)
    if not rows.size:
        return q
    hot, _ = quantize_head(head[torch.from_numpy(rows)], run.cfg, st, 8)
    share = rows.size / head.shape[0]
    run.notes.append(f"LM head: the {rows.size} rows the calibration text reads most ({share:.1%} "
                     f"of the vocabulary, {tokens[rows].sum() / max(tokens.sum(), 1):.1%} of its tokens) kept "
                     "at int8 too; the graph writes their int8 logits over the int4 ones")
    return HotRowsTensor(q.codes, q.scales, q.zeros, q.bits, q.group, rows=rows, hot=hot)
