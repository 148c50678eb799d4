"""The validate stage: the validated file against the PyTorch reference on the host, then the cross-checks of the
other backends' files, the emulated runs of the target's own files and the device run, each a stage of its own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

Progress = Callable[[str, str], None]


def validate_file(model: Any, path: Path, plan: Any, settings: Any, progress: Progress | None) -> Any:
    """The validated file's accuracy and speed against the PyTorch reference, on the host."""
    from slm_export.text import load_text
    from slm_export.validation.validate import validate_decoder, validate_encoder

    text = load_text(plan.eval_data, "evaluation")
    fn = validate_decoder if model.kind == "decoder" else validate_encoder
    step = (lambda what: progress("validate", what)) if progress else None
    from slm_export.backends import EXACT_QDQ

    if plan.backend in EXACT_QDQ and path.suffix == ".onnx":  # TensorRT, the DPU: exact int8 arithmetic
        settings = replace(settings, exact_qdq=True)
    metrics = fn(path, model.torch_module(), model.tokenizer, text, settings, step)
    metrics["eval_text"] = {"value": text.name, "unit": f"sha256 {text.sha256[:16]}", "where": "input"}
    return metrics


def further_runs(model: Any, folder: Path, results: list[Any], validated: str, plan: Any, profile: Any,
                  settings: Any, stages: Any, runs: dict[str, Any],
                  progress: Progress | None) -> dict[str, Any]:
    """Which runtime loads which file (stage ``loads``), the cross-checks of the other backends' files on the
    host, then the emulated runs of the target's own files (each a stage of its own); their metrics, with their
    details put in ``runs``."""
    from slm_export.text import load_text
    from slm_export.validation import runs as checks
    from slm_export.validation.loads import runtime_loads

    runs["loads"] = stages.run("loads", lambda: runtime_loads(folder))
    text = load_text(plan.eval_data, "evaluation")
    metrics: dict[str, Any] = {}
    if any(r.status == "done" and r.runtime_model and r.runtime_model != validated for r in results):
        m, runs["crosscheck"] = stages.run("crosscheck", lambda: checks.crosscheck(
            model, folder, results, validated, text, settings, progress))
        metrics.update(m)
    # A device given: the emulator's stand-in is not needed unless asked for (--emulate).
    if plan.emulate == "on" or (plan.emulate == "auto" and not settings.device):
        m, runs["emulate"] = stages.run("emulate", lambda: checks.emulate(
            model, folder, results, profile, text, settings, plan.emulate == "on", progress))
        metrics.update(m)
    if settings.device:
        m, device = stages.run("device", lambda: checks.on_device(model, folder, results, validated, text, settings,
                                                                   progress))
        runs["device"] = [device]
        metrics.update(m)
    return metrics
