"""Run a plan: target profile -> load -> compress -> export -> compile -> validate -> report.

The plan itself is made by ``planning.make_plan`` (re-exported here). Each stage records its time, the
process's peak RSS so far, and its output size. Everything is
written into a temporary folder beside the destination and renamed into place only at the end.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from slm_export import memory, output, preflight
from slm_export.errors import DiskFull, ExportError, OutOfMemory, SlmExportError, ValidationFailed
from slm_export.models.lazy import total_memory
from slm_export.plan import Plan
from slm_export.planning import IGNORED, make_plan
from slm_export.report import Report, Runs, build_report, compression_section, failed_message, write_report
from slm_export.targets import TargetProfile
from slm_export.validation.stage import further_runs, validate_file
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
        settings: ValidationSettings | None = None, extra_files: dict[str, str] | None = None) -> RunResult:
    """Execute ``plan``. Raises ``ValidationFailed`` (carrying the report) when a goal is missed.

    ``extra_files``: text files (name -> content) written into the artifact before it is sealed, so the
    manifest lists and hashes them like the rest (the matrix's record of a cell's inputs).

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
        preflight.check_inputs(plan)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        need = [0]
        try:
            tmp.mkdir(parents=True, exist_ok=False)
            with torch_threads(settings.threads):
                report = _stages(plan, profile, settings, tmp, progress, need)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text, encoding="utf-8")
            dest = output.failed_name(out) if report.verdict == "FAIL" and keep_passing else out
            placed = {"folder": str(dest), "replaced": failed_state if dest != out else state,
                      "stale_removed": cleaned, "predicted_bytes": need[0]}
            if dest != out:
                placed["kept_passing_artifact"] = str(out)
            report = _seal(report.placed(placed, cleaned), tmp)
            output.place(tmp, dest)
        except BaseException as exc:
            _fail(exc, tmp, out, need[0])
            raise
    data = report.to_dict()
    if report.verdict == "FAIL":
        message = failed_message(data)
        if dest != out:
            message += f". The passing artifact in {out} was kept; this run's artifact is in {dest}"
        raise ValidationFailed(message, data)
    return RunResult(data, dest)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """``--threads`` holds for the whole run, calibration included, not only for validation: on a machine the run
    shares (a CI runner, two exports side by side), torch's default of one thread per core makes its OpenMP
    threads wait on each other's descheduled peers (docs/benchmarks/compress.md). 0: torch's default."""
    if threads <= 0:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fail(exc: BaseException, tmp: Path, out: Path, need: int) -> None:
    """Remove the partial artifact; a write that failed on a (nearly) full disk is reported as that."""
    # Runtimes word a full disk their own way ("Failed to write external initializers"): a disk with almost
    # nothing left at the moment of the failure is taken as the cause.
    full = output.is_disk_full(exc) or output.free_bytes(out.parent) < output.NEARLY_FULL
    shutil.rmtree(tmp, ignore_errors=True)
    user_error = isinstance(exc, SlmExportError) and exc.exit_code in (1, 2)
    if full and isinstance(exc, Exception) and not user_error and not isinstance(exc, DiskFull):
        free = output.free_bytes(out.parent)
        raise DiskFull(f"disk full while writing the artifact in {out.parent}: {free / 1e6:.0f} MB free, about "
                       f"{need / 1e6:.0f} MB needed; nothing was written. Free some space or choose another "
                       "--out") from None


def _stages(plan: Plan, profile: TargetProfile, settings: ValidationSettings, tmp: Path,
            progress: Progress | None, need: list[int]) -> Report:
    """load -> compress -> export -> compile -> validate, into ``tmp``; the report of what they returned."""
    from slm_export.models import load_model

    stages = Stages(progress)
    stream = {"on": True, "off": False}.get(plan.stream)
    model = stages.run("load", lambda: load_model(plan.model, stream), lambda m: m.weight_bytes)
    prediction = memory.predict(model, plan, settings)
    problem = memory.check_fits(prediction, total_memory())
    if problem:
        raise OutOfMemory(problem)
    rebuild_note = preflight.check_rebuilds(model, plan, profile)
    need[0] = preflight.predicted_bytes(model, plan, profile)
    output.check_space(tmp, need[0])
    notes = [n for n in [rebuild_note, preflight.check_eval_tokens(model, plan, settings), _stream_note(model, plan)]
             if n]
    compressed = _compress(model, plan, stages, progress)
    from slm_export.backends import reads_weights

    exported = stages.run("export", lambda: _export(model, plan, tmp, compressed), lambda e: e.bytes)
    # Once the files hold the compressed weights, nothing reads them but the backends that rebuild the model
    # from them: dropped here, ONNX Runtime's compile and validation sessions do not sit beside a second copy.
    if compressed is not None and not reads_weights(plan, profile):
        compressed = _dropped(compressed)
    results, runtime_file = _compile(model, plan, profile, exported, compressed, stages)
    if compressed is not None:
        compressed = _dropped(compressed)
    metrics, runs = _validate(model, plan, profile, settings, tmp, results, runtime_file, stages, progress)
    sparsity = _check_sparsity(exported, plan)
    eval_change = metrics.get("perplexity_change_pct", {}).get("value")
    return build_report(plan, profile, model, exported, results, metrics, stages.records, settings.goals_file,
                        validated_file=runtime_file if plan.validate else None,
                        compression=compression_section(compressed, eval_change), runs=Runs.from_map(runs),
                        sparsity=sparsity, notes=notes, memory=prediction.to_dict())


def _dropped(compressed: Any) -> Any:
    """``compressed`` without its weights, their memory given back to the system: the many small code arrays
    live in the allocator's heap, which otherwise stays resident under the runtime's session."""
    import gc

    from slm_export.calibration.sequential import trim_heap

    if not compressed.weights:
        return compressed
    compressed = replace(compressed, weights={})
    gc.collect()
    trim_heap()
    return compressed


def _stream_note(model: Any, plan: Plan) -> str | None:
    if plan.stream == "on" and not model.streamed:
        return ("weights held in memory, not streamed (--stream on): streaming reads safetensors files whose tensor "
                "names are the module's own; this model's are not (a .bin or GGUF file, or renamed tensors)")
    return None


def _compress(model: Any, plan: Plan, stages: Stages, progress: Progress | None) -> Any:
    if not plan.compresses:
        stages.skip("compress", f"{plan.precision} needs no calibration")
        return None
    from slm_export.calibration.compress import compress

    step = (lambda what: progress("compress", what)) if progress else None
    compressed = stages.run("compress", lambda: compress(model, plan, step))
    if plan.max_ppl_increase is not None:
        from slm_export.calibration.budget import fit_budget

        compressed = stages.run("budget", lambda: fit_budget(model, compressed, plan, progress))
    return compressed


def _export(model: Any, plan: Plan, tmp: Path, compressed: Any) -> Any:
    from slm_export.exporters.onnx import OnnxExporter

    return OnnxExporter().export(model, plan, tmp, compressed.weights if compressed else None)


def _compile(model: Any, plan: Plan, profile: TargetProfile, exported: Any, compressed: Any,
             stages: Stages) -> tuple[list[Any], str]:
    from slm_export.backends import CompileJob, compile_all, validated_file

    weights = compressed.weights if compressed is not None and compressed.weights else None
    job = CompileJob(plan, profile, exported.model_path, model.kind, model=model, weights=weights)
    results = stages.run("compile", lambda: compile_all(job))
    if results[0].status != "done":
        stages.records[-1].update(status="not run", note=results[0].note)
    return results, validated_file(results, exported.model_path.name)


def _validate(model: Any, plan: Plan, profile: TargetProfile, settings: ValidationSettings, tmp: Path,
              results: list[Any], runtime_file: str, stages: Stages,
              progress: Progress | None) -> tuple[dict[str, Any], dict[str, Any]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    if not plan.validate:
        stages.skip("validate", "--no-validate")
        return {}, runs
    metrics = stages.run("validate", lambda: validate_file(model, tmp / runtime_file, plan, settings, progress))
    if model.kind == "decoder":
        metrics.update(further_runs(model, tmp, results, runtime_file, plan, profile, settings, stages, runs,
                                    progress))
    return metrics, runs


def _check_sparsity(exported: Any, plan: Plan) -> dict[str, Any] | None:
    if not plan.sparsity:
        return None
    from slm_export.sparsity.verify import verify_sparsity

    found = verify_sparsity(exported.model_path, plan.sparsity)
    if not found["all_satisfy_pattern"]:
        raise ExportError(f"exported weights break the {plan.sparsity} pattern: {found}")
    return found


def _seal(report: Report, tmp: Path) -> Report:
    """Hash every file, name them in the report, write the reports, then seal the reports in the manifest."""
    from slm_export import integrity

    table = integrity.file_table(tmp)
    report = report.sealed({"algorithm": "sha256", "hashed_at": integrity.now(), "manifest": integrity.MANIFEST_FILE,
                            "files": {k: v["bytes"] for k, v in table.items()},
                            "also_sealed": [*integrity.REPORTS, integrity.MANIFEST_FILE]})
    write_report(report, tmp)
    table.update({name: {"bytes": (tmp / name).stat().st_size, "sha256": integrity.sha256_file(tmp / name)}
                  for name in integrity.REPORTS})
    integrity.seal(tmp, integrity.read_manifest(tmp), table)
    return report


__all__ = ["IGNORED", "RunResult", "SlmExportError", "build_report", "failed_message", "further_runs", "make_plan",
           "run", "validate_file"]
