"""Run a plan: target profile -> load -> compress -> export -> compile -> validate -> report.

The plan itself is made by ``planning.make_plan`` (re-exported here). Each stage records its time, the
process's peak RSS so far, and its output size. Everything is
written into a temporary folder beside the destination and renamed into place only at the end.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from slm_export import output
from slm_export.errors import (
    DiskFull,
    ExportError,
    SlmExportError,
    ValidationFailed,
)
from slm_export.plan import QUANTIZED, Plan
from slm_export.planning import IGNORED, make_plan
from slm_export.report import SCHEMA_VERSION, default_goals, load_goals, write_report
from slm_export.targets import TargetProfile
from slm_export.validation.validate import ValidationSettings, peak_rss_mb

Progress = Callable[[str, str], None]  # (stage, message)


@dataclass(frozen=True)
class RunResult:
    """What ``run`` returns: the report and whether every goal passed."""

    report: dict[str, Any]
    out: Path | None

    @property
    def passed(self) -> bool:
        """No goal failed (a run with no goals, e.g. a pruned model, passes; see ``verdict``)."""
        return self.report["verdict"] in ("PASS", "NO GOALS")


class Stages:
    def __init__(self, progress: Progress | None) -> None:
        self.records: list[dict[str, Any]] = []
        self.progress = progress

    def run(self, name: str, fn: Callable[[], Any], size: Callable[[Any], int] | None = None) -> Any:
        if self.progress:
            self.progress(name, "start")
        t = time.perf_counter()
        try:
            result = fn()
        except BaseException:
            self.records.append({"name": name, "status": "failed", "seconds": time.perf_counter() - t,
                                 "peak_rss_mb": peak_rss_mb()})
            raise
        rec = {"name": name, "status": "done", "seconds": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb()}
        if size is not None:
            rec["output_bytes"] = size(result)
        self.records.append(rec)
        if self.progress:
            self.progress(name, "done")
        return result

    def skip(self, name: str, note: str) -> None:
        self.records.append({"name": name, "status": "skipped", "seconds": 0.0, "peak_rss_mb": peak_rss_mb(),
                             "note": note})


def run(plan: Plan, profile: TargetProfile, progress: Progress | None = None,
        settings: ValidationSettings | None = None) -> RunResult:
    """Execute ``plan``. Raises ``ValidationFailed`` (carrying the report) when a goal is missed.

    The output folder is checked, locked and cleared of dead runs' leftovers before any work; the artifact is
    built in a hidden partial folder beside it and moved into place only at the end (``output.py``).
    """
    settings = settings or ValidationSettings()
    out = output.resolve_out(plan.out)
    with output.OutputLock(out):
        cleaned = output.remove_stale(out)
        for note in cleaned:
            if progress:
                progress("output", note)
        state = output.check_out(out, plan.force, (plan.model, plan.eval_data, plan.calib_data,
                                                   settings.goals_file))
        keep_passing = state == "artifact" and output.passing_verdict(out)
        failed_state = output.check_out(output.failed_name(out), plan.force) if keep_passing else ""
        check_inputs(plan)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        need = 0
        try:
            tmp.mkdir(parents=True, exist_ok=False)
            report, need = _build(plan, profile, settings, tmp, progress)
            report["output"] = {"folder": str(out), "replaced": state, "stale_removed": cleaned,
                                "predicted_bytes": need}
            report["notes"] = [*report["notes"], *cleaned]
            dest = out
            if report["verdict"] == "FAIL" and keep_passing:
                dest = output.failed_name(out)
                report["output"].update(replaced=failed_state, kept_passing_artifact=str(out))
            report["output"]["folder"] = str(dest)
            _seal(report, tmp)
            output.place(tmp, dest)
        except BaseException as exc:
            # Runtimes word a full disk their own way ("Failed to write external initializers"): a disk with
            # almost nothing left at the moment of the failure is taken as the cause.
            full = output.is_disk_full(exc) or output.free_bytes(out.parent) < output.NEARLY_FULL
            shutil.rmtree(tmp, ignore_errors=True)
            user_error = isinstance(exc, SlmExportError) and exc.exit_code in (1, 2)
            if full and isinstance(exc, Exception) and not user_error and not isinstance(exc, DiskFull):
                free = output.free_bytes(out.parent)
                raise DiskFull(f"disk full while writing the artifact in {out.parent}: {free / 1e6:.0f} MB free, "
                               f"about {need / 1e6:.0f} MB needed; nothing was written. Free some space or choose "
                               "another --out") from None
            raise
    result = RunResult(report, dest)
    if report["verdict"] == "FAIL":
        message = failed_message(report)
        if dest != out:
            message += f". The passing artifact in {out} was kept; this run's artifact is in {dest}"
        raise ValidationFailed(message, report)
    return result


def check_inputs(plan: Plan) -> None:
    """The evaluation and calibration files: present, text, not empty; before any model is loaded."""
    from slm_export.validation.text import check_text_input

    if plan.eval_data is not None and plan.validate:
        check_text_input(plan.eval_data, "evaluation")
    if plan.calib_data is not None and (plan.precision in QUANTIZED or plan.sparsity):
        check_text_input(plan.calib_data, "calibration")
    if plan.max_ppl_increase is not None:
        from slm_export.calibration.data import check_budget_sources

        check_budget_sources(plan.calib_data, plan.eval_data)


# Bytes per weight as stored, scales and zero points included; the embedding table stays float32 in quantized
# graphs. A prediction to refuse a run that cannot fit, not a promise.
STORED_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.1, "int4": 0.65}


def predicted_bytes(model: Any, plan: Plan, profile: TargetProfile) -> int:
    """The artifact's size on disk: one copy of the weights in the ONNX graph and one per backend."""
    vocab = getattr(model.config, "vocab_size", None)
    embed = max((t.numel() for n, t in model.weights.items() if t.dim() == 2 and t.shape[0] == vocab), default=0)
    params = model.weight_bytes // 4
    width = STORED_BYTES.get(plan.precision, 4.0)
    one = embed * 4 + (params - embed) * width if plan.precision in QUANTIZED else params * width
    copies = 1 + len(profile.backends)  # ONNX Runtime writes its optimized graph, a copy of the weights too
    return int(one * copies * 1.05)


def _build(plan: Plan, profile: TargetProfile, settings: ValidationSettings, tmp: Path,
           progress: Progress | None) -> tuple[dict[str, Any], int]:
    """The stages, into ``tmp``: the report (not yet written) and the predicted artifact size."""
    from slm_export.backends import CompileJob, compile_all, validated_file
    from slm_export.exporters.onnx import OnnxExporter
    from slm_export.models import load_model

    stages = Stages(progress)
    model = stages.run("load", lambda: load_model(plan.model), lambda m: m.weight_bytes)
    need = predicted_bytes(model, plan, profile)
    output.check_space(tmp, need)
    early_notes = [n for n in [_check_eval_tokens(model, plan, settings)] if n] if plan.validate else []
    compressed = None
    if plan.precision in QUANTIZED or plan.sparsity:
        from slm_export.calibration.compress import compress

        step = (lambda what: progress("compress", what)) if progress else None
        compressed = stages.run("compress", lambda: compress(model, plan, step))
        if plan.max_ppl_increase is not None:
            from slm_export.calibration.budget import fit_budget

            compressed = stages.run("budget", lambda: fit_budget(model, compressed, plan, progress))
    else:
        stages.skip("compress", f"{plan.precision} needs no calibration")
    weights = compressed.weights if compressed else None
    exported = stages.run("export", lambda: OnnxExporter().export(model, plan, tmp, weights), lambda e: e.bytes)
    job = CompileJob(plan, profile, exported.model_path, model.kind, model=model, weights=weights)
    results = stages.run("compile", lambda: compile_all(job))
    compiled = results[0]
    if compiled.status != "done":
        stages.records[-1].update(status="not run", note=compiled.note)
    runtime_file = validated_file(results, exported.model_path.name)
    metrics: dict[str, Any] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    if plan.validate:
        metrics = stages.run("validate", lambda: validate_file(model, tmp / runtime_file, plan, settings, progress))
        if model.kind == "decoder":
            metrics.update(further_runs(model, tmp, results, runtime_file, plan, profile, settings, stages,
                                         runs, progress))
    else:
        stages.skip("validate", "--no-validate")
    report = build_report(plan, profile, model, exported, compiled, metrics, stages.records, settings.goals_file)
    report["backends"] = [asdict(r) for r in results]
    report["validated_file"] = runtime_file if plan.validate else None
    report["compression"] = _compression_section(compressed)
    report["notes"] = [*report["notes"], *early_notes]
    budget = (report["compression"] or {}).get("budget")
    if budget and "perplexity_change_pct" in metrics:  # the figure the budget reached on the evaluation text
        budget["eval_ppl_change_pct"] = metrics["perplexity_change_pct"]["value"]
    report["crosschecks"] = runs.get("crosscheck", [])
    report["emulation"] = runs.get("emulate", [])
    report["device"] = runs.get("device", [])
    if plan.sparsity:
        from slm_export.sparsity.verify import verify_sparsity

        report["sparsity"] = verify_sparsity(exported.model_path, plan.sparsity)
        if not report["sparsity"]["all_satisfy_pattern"]:
            raise ExportError(f"exported weights break the {plan.sparsity} pattern: {report['sparsity']}")
    return report, need


def _check_eval_tokens(model: Any, plan: Plan, settings: ValidationSettings) -> str | None:
    """Enough evaluation tokens for one window, found before minutes of calibration are spent; a note when the
    text holds fewer windows than asked."""
    from slm_export.validation.text import check_token_count, load_text

    text = load_text(plan.eval_data, "evaluation")
    return check_token_count(model.tokenizer, text, settings.windows, settings.window_len, "evaluation")


def _seal(report: dict[str, Any], tmp: Path) -> None:
    """Hash every file, name them in the report, write the report, then seal the reports in the manifest."""
    from slm_export import integrity

    table = integrity.file_table(tmp)
    report["integrity"] = {"algorithm": "sha256", "hashed_at": integrity.now(), "manifest": integrity.MANIFEST_FILE,
                           "files": {k: v["bytes"] for k, v in table.items()},
                           "also_sealed": [*integrity.REPORTS, integrity.MANIFEST_FILE]}
    write_report(report, tmp)
    manifest = integrity.read_manifest(tmp)
    table.update({name: {"bytes": (tmp / name).stat().st_size, "sha256": integrity.sha256_file(tmp / name)}
                  for name in integrity.REPORTS})
    integrity.seal(tmp, manifest, table)


def validate_file(model: Any, path: Path, plan: Plan, settings: ValidationSettings, progress: Progress | None) -> Any:
    from slm_export.validation.text import load_text
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


def further_runs(model: Any, folder: Path, results: list[Any], validated: str, plan: Plan, profile: TargetProfile,
                  settings: ValidationSettings, stages: Stages, runs: dict[str, Any],
                  progress: Progress | None) -> dict[str, Any]:
    """The cross-checks of the other backends' files on the host, then the emulated runs of the target's own
    files (each a stage of its own); their metrics, with their details put in ``runs``."""
    from slm_export.validation import runs as checks
    from slm_export.validation.text import load_text

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


def _compression_section(result: Any) -> dict[str, Any] | None:
    if result is None:
        return None
    layers = sorted(result.layers, key=lambda e: e.get("output_sqnr_db", e["weight_sqnr_db"]))
    return {"calibration": result.calibration, "seconds": result.seconds, "bits_per_weight": result.bits_per_weight,
            "notes": result.notes, "layers": result.layers, "budget": result.budget, "tuning": result.tuning,
            "least_accurate_layers": [e["layer"] for e in layers[:5]]}


def failed_message(report: dict[str, Any]) -> str:
    failed = [g for g in report["goals"] if g["status"] == "FAIL"]
    parts = [f"{g['metric']} = {g.get('value')} (goal {g['op']} {g['threshold']})" for g in failed]
    return "goals missed: " + "; ".join(parts)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "machine": platform.machine()}
    for pkg in ("slm-export", "torch", "transformers", "onnx", "onnxruntime", "numpy", "gguf"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def build_report(plan: Plan, profile: TargetProfile, model: Any, exported: Any, compiled: Any,
            metrics: dict[str, Any], stages: list[dict[str, Any]], goals_file: str | None = None) -> dict[str, Any]:
    from slm_export.validation.runs import run_goals

    roof = {}
    if model.kind == "decoder":
        est = profile.roofline(exported.weight_bytes_per_token, exported.flops_per_token, plan.precision)
        roof = {f"{profile.id}_decode_tokens_per_s_bound": est["decode_tokens_per_s"],
                f"{profile.id}_prefill_tokens_per_s_bound": est["prefill_tokens_per_s"],
                "weight_bytes_read_per_token": exported.weight_bytes_per_token,
                "bandwidth_gbs": est["bandwidth_gbs"], "peak_gflops": est["peak_gflops"],
                "source": f"{profile.id} profile: memory.bandwidth_gbs, compute.{plan.precision}"}
    bound = roof.get(f"{profile.id}_decode_tokens_per_s_bound")
    if bound and "device_decode_tokens_per_s_p50" in metrics:
        measured = metrics["device_decode_tokens_per_s_p50"]
        metrics = {**metrics, "device_decode_fraction_of_roofline": {
            "value": measured["value"] / bound, "unit": "", "where": f"{measured['where']}, over the {profile.id} "
            f"profile's roofline bound ({bound:.1f} tokens/s, estimated)"}}
    if bound and profile.id == "host" and "decode_tokens_per_s_p50" in metrics:
        # the host is the target: its own run against its own (measured-bandwidth) roofline
        measured = metrics["decode_tokens_per_s_p50"]
        metrics = {**metrics, "decode_fraction_of_roofline": {
            "value": measured["value"] / bound, "unit": "", "where": f"{measured['where']}, over the host's "
            f"roofline bound ({bound:.1f} tokens/s: measured bandwidth / weight bytes read per token)"}}
    if goals_file:
        wanted = load_goals(goals_file)
    else:
        quantized = plan.precision in QUANTIZED
        act_quant = quantized and (plan.method in ("smoothquant", "dynamic") or plan.accuracy_level == 4)
        wanted = default_goals(model.kind, plan.precision, plan.method, plan.sparsity, plan.max_ppl_increase,
                               plan.pow2_scales) + run_goals(metrics, quantized, act_quant)
    goals = [g.evaluate(metrics) for g in wanted] if metrics else []
    if not metrics:
        verdict = "NOT VALIDATED"
    elif not wanted:
        verdict = "NO GOALS"
    else:
        verdict = "PASS" if all(g["status"] == "PASS" for g in goals) else "FAIL"
    artifact_bytes = sum(f.stat().st_size for f in Path(exported.model_path).parent.rglob("*") if f.is_file())
    metrics = {**metrics,
               "artifact_bytes": {"value": artifact_bytes, "unit": "bytes", "where": "artifact folder"},
               "peak_rss_mb": {"value": peak_rss_mb(), "unit": "MB",
                               "where": "measured on host: whole run (load, export, validation) in one process"}}
    return {
        "schema_version": SCHEMA_VERSION, "verdict": verdict, "notes": list(plan.notes),
        "target": {"id": profile.id, "name": profile.name, "origin": profile.origin},
        "model": {"name": model.name, "path": model.path, "format": model.fmt, "kind": model.kind,
                  "architecture": model.model_type, "fingerprint": model.fingerprint,
                  "float32_weight_bytes": model.weight_bytes},
        "plan": plan.to_dict(), "artifact": {"files": list(exported.files), "bytes": exported.bytes,
                                             "graph_ops": exported.graph_ops, "opset": exported.opset},
        "compile": asdict(compiled),
        "stages": stages, "metrics": metrics, "goals": goals, "roofline": roof, "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


__all__ = ["IGNORED", "RunResult", "SlmExportError", "make_plan", "run"]
