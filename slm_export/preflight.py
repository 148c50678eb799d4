"""Checks before any work: the text inputs, enough evaluation tokens, and the disk space the artifact needs."""

from __future__ import annotations

from typing import Any

from slm_export.plan import QUANTIZED

# Bytes per weight as stored, scales and zero points included; the embedding table stays float32 in quantized
# graphs. A prediction to refuse a run that cannot fit, not a promise.
STORED_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.1, "int4": 0.65}


def check_inputs(plan: Any) -> None:
    """The evaluation and calibration files: present, text, not empty; before any model is loaded."""
    from slm_export.text import check_text_input

    if plan.eval_data is not None and plan.validate:
        check_text_input(plan.eval_data, "evaluation")
    if plan.calib_data is not None and (plan.precision in QUANTIZED or plan.sparsity):
        check_text_input(plan.calib_data, "calibration")
    if plan.max_ppl_increase is not None:
        from slm_export.calibration.data import check_budget_sources

        check_budget_sources(plan.calib_data, plan.eval_data)


def predicted_bytes(model: Any, plan: Any, profile: Any) -> int:
    """The artifact's size on disk: one copy of the weights in the ONNX graph and one per backend."""
    vocab = getattr(model.config, "vocab_size", None)
    embed = max((t.numel() for t in model.weights.values() if t.dim() == 2 and t.shape[0] == vocab), default=0)
    params = model.weight_bytes // 4
    width = STORED_BYTES.get(plan.precision, 4.0)
    one = embed * 4 + (params - embed) * width if plan.precision in QUANTIZED else params * width
    copies = 1 + len(profile.backends)  # ONNX Runtime writes its optimized graph, a copy of the weights too
    return int(one * copies * 1.05)


def check_eval_tokens(model: Any, plan: Any, settings: Any) -> str | None:
    """Enough evaluation tokens for one window, found before minutes of calibration are spent; a note when the
    text holds fewer windows than asked."""
    from slm_export.text import check_token_count, load_text

    if not plan.validate:
        return None
    text = load_text(plan.eval_data, "evaluation")
    return check_token_count(model.tokenizer, text, settings.windows, settings.window_len, "evaluation")
