"""Re-validate an existing artifact: the same validation, cross-checks, emulated and device runs as an
export, on the files already there, with the report rewritten in place (``slm-export validate DIR``)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from slm_export.errors import ConfigError, ValidationFailed
from slm_export.pipeline import (
    Progress,
    RunResult,
    Stages,
    build_report,
    failed_message,
    further_runs,
    make_plan,
    validate_file,
)
from slm_export.plan import Plan
from slm_export.report import write_report
from slm_export.targets import TargetProfile
from slm_export.validation.validate import ValidationSettings


def load_manifest(artifact: Path) -> dict[str, Any]:
    """Read an artifact's manifest, for ``validate``."""
    from slm_export.exporters.onnx import MANIFEST_FILE

    path = artifact / MANIFEST_FILE
    if not path.is_file():
        raise ConfigError(f"{artifact} is not an slm-export artifact (no {MANIFEST_FILE})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is corrupt: {exc}") from None



def revalidate(artifact: str | Path, eval_data: str | None = None, progress: Progress | None = None,
               settings: ValidationSettings | None = None, emulate: str | None = None) -> RunResult:
    """Re-run validation of an existing artifact (and its cross-checks, emulated and device runs) and rewrite
    its reports (atomically, file by file). ``emulate`` overrides the artifact's plan ("on", "off")."""
    from dataclasses import fields

    from slm_export.backends import CompileResult
    from slm_export.exporters.onnx import MODEL_FILE, ExportResult
    from slm_export.models import load_model
    from slm_export.targets import get_target

    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    old = json.loads((artifact / "report.json").read_text()) if (artifact / "report.json").is_file() else {}
    old_plan = old.get("plan", {})
    origin = old.get("target", {}).get("origin", "built-in")
    profile: TargetProfile = get_target(old_plan.get("target", "host")) if origin == "built-in" \
        else get_target(target_file=origin)
    plan = Plan(**{**old_plan, "notes": tuple(old_plan.get("notes", ())), "eval_data": eval_data,
                   "validate": True}) if old_plan else make_plan(profile, manifest["source_model"], artifact,
                                                                 manifest["precision"], eval_data)
    stages = Stages(progress)
    model = stages.run("load", lambda: load_model(manifest["source_model"]), lambda m: m.weight_bytes)
    if model.fingerprint != manifest["fingerprint"]:
        raise ConfigError(f"the model at {manifest['source_model']} changed since {artifact} was exported "
                          "(fingerprint differs); export again")
    if emulate:
        plan = replace(plan, emulate=emulate)
    settings = settings or ValidationSettings()
    path = artifact / (old.get("validated_file") or MODEL_FILE)
    metrics = stages.run("validate", lambda: validate_file(model, path, plan, settings, progress))
    known = {f.name for f in fields(CompileResult)}
    results = [CompileResult(**{k: (tuple(v) if k == "files" else v) for k, v in b.items() if k in known})
               for b in old.get("backends", [])]
    runs: dict[str, list[dict[str, Any]]] = {}
    if model.kind == "decoder" and results:
        metrics.update(further_runs(model, artifact, results, path.name, plan, profile, settings, stages, runs,
                                     progress))
    exported = ExportResult(path, tuple(manifest["files"]), old.get("artifact", {}).get("bytes", 0),
                            old.get("roofline", {}).get("weight_bytes_read_per_token", 0), 0,
                            manifest["graph_ops"], manifest["opset"])
    compiled = results[0] if results else CompileResult(plan.backend, "not run", "")
    report = build_report(plan, profile, model, exported, compiled, metrics, old.get("stages", []) + stages.records,
                     settings.goals_file)
    report["roofline"] = old.get("roofline", report["roofline"])
    report["backends"] = old.get("backends", [report["compile"]])
    report["validated_file"] = path.name
    report["compression"] = old.get("compression")
    report["crosschecks"] = runs.get("crosscheck", [])
    report["emulation"] = runs.get("emulate", [])
    report["device"] = runs.get("device", [])
    tmp = artifact / f".report.partial-{os.getpid()}"
    tmp.mkdir()
    try:
        write_report(report, tmp)
        for name in ("report.json", "report.md"):
            (tmp / name).replace(artifact / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = RunResult(report, artifact)
    if report["verdict"] == "FAIL":
        raise ValidationFailed(failed_message(report), report)
    return result
