"""Checks before any work: the text inputs, enough evaluation tokens, the disk space the artifact needs, and
what the backends that rebuild the decoder in PyTorch (ExecuTorch, TVM) cannot build."""

from __future__ import annotations

from typing import Any

import numpy as np

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
    embed = max((int(np.prod(s)) for s in model.shapes().values() if len(s) == 2 and s[0] == vocab), default=0)
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


REBUILT_PRECISIONS = ("fp32", "int8", "int4")


def rebuild_checks() -> dict[str, Any]:
    """The backends that rebuild the decoder in PyTorch, and their ``unsupported(spec)`` checks."""
    from slm_export.backends import executorch, tvm

    return {"executorch": executorch.unsupported, "tvm": tvm.unsupported}


def check_rebuilds(model: Any, plan: Any, profile: Any) -> str | None:
    """A decoder the plan's own PyTorch-rebuilding backend (ExecuTorch, TVM) cannot build is refused after
    loading, before minutes of compression, naming the backend, the family, the feature and where it can go.
    A secondary backend that cannot build it does not stop the run: its step reports "not run" with the
    reason (``backends.compile_artifact``), and the returned note says so up front."""
    checks = rebuild_checks()
    names = [b for b in dict.fromkeys([plan.backend, *profile.backends]) if b in checks]
    # the rebuilds take decoders at these precisions; anything else they report as "not run" themselves
    if not names or plan.precision not in REBUILT_PRECISIONS or model.kind != "decoder":
        return None
    from slm_export.errors import ConfigError
    from slm_export.models.adapters import spec_for
    from slm_export.models.lazy import LazyView

    spec = spec_for(model.config, LazyView(model.weights, model.weights) if model.streamed else model.weights)
    refused = {b: why for b, why in ((b, check(spec, plan.max_seq_len)) for b, check in checks.items()) if why}
    if plan.backend in refused:
        raise ConfigError(f"{profile.id}'s backend {plan.backend} cannot build this {spec.model_type} model: "
                          f"{refused[plan.backend]}. {_elsewhere(set(refused))}")
    skipped = [n for n in names if n in refused]
    if not skipped:
        return None
    return "; ".join(f"{profile.id}'s secondary backend {n} cannot build this {spec.model_type} model "
                     f"({refused[n]}): its step will not run, the {plan.backend} artifact is built" for n in skipped)


def _elsewhere(refusing: set[str]) -> str:
    """Where a model the ``refusing`` backends cannot build can go instead."""
    from slm_export.targets import registry

    reg = registry()
    ok = [n for n in reg.names() if not refusing & set(reg.get(n).backends)]
    return (f"The ONNX graph takes it (ONNX Runtime, TensorRT): a target whose backends leave out "
            f"{' and '.join(sorted(refusing))} ({', '.join(ok) or 'none built in'}), or a --target-file of the "
            f"same device whose [backends] order leaves them out, or whose [graph] max_seq_len is short enough")
