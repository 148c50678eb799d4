"""Re-validate an existing artifact: the same validation, cross-checks, emulated and device runs as an
export, on the files already there, with the report rewritten in place (``slm-export validate DIR``)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from slm_export.errors import ConfigError, ValidationFailed
from slm_export.pipeline import Progress, RunResult, Stages
from slm_export.plan import Plan
from slm_export.planning import make_plan
from slm_export.report import Report, Runs, build_report, failed_message, write_report
from slm_export.targets import TargetProfile
from slm_export.validation.stage import further_runs, validate_file
from slm_export.validation.validate import ValidationSettings


def load_manifest(artifact: Path) -> dict[str, Any]:
    """Read an artifact's manifest and check every file it lists (``IntegrityError`` names the first that
    changed); for ``validate``."""
    from slm_export.integrity import verify

    if not artifact.is_dir():
        raise ConfigError(f"{artifact} is not an slm-export artifact folder (no such folder)")
    manifest = verify(artifact)
    for key, kind in (("source_model", str), ("fingerprint", str), ("precision", str), ("graph_ops", str),
                      ("opset", int), ("files", list)):
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise ConfigError(f"{artifact / 'artifact.json'}: field {key!r} is missing or not a {kind.__name__}")
    return manifest


def parse_report(raw: bytes | str, where: str = "report.json") -> dict[str, Any]:
    """An artifact's report.json, with the types ``validate`` reads checked: ``ConfigError`` otherwise."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{where} is corrupt ({str(exc)[:120]}); export the artifact again") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} is corrupt: not a JSON object")
    for key, kind in (("plan", dict), ("target", dict), ("backends", list), ("stages", list),
                      ("roofline", dict), ("artifact", dict)):
        if key in data and not isinstance(data[key], kind):
            raise ConfigError(f"{where}: {key!r} must be a JSON {'object' if kind is dict else 'array'}")
    if not all(isinstance(b, dict) for b in data.get("backends", [])):
        raise ConfigError(f"{where}: every entry of 'backends' must be a JSON object")
    if not isinstance(data.get("target", {}).get("origin", "built-in"), str):
        raise ConfigError(f"{where}: target.origin must be a string")
    if data.get("validated_file") is not None and not isinstance(data["validated_file"], str):
        raise ConfigError(f"{where}: validated_file must be a string")
    if "plan" in data:
        _check_plan(data["plan"], where)
    return data


def _check_plan(raw: dict[str, Any], where: str) -> None:
    from dataclasses import MISSING, fields

    known = {f.name: f for f in fields(Plan)}
    unknown = set(raw) - set(known)
    if unknown:
        raise ConfigError(f"{where}: unknown plan field(s) {', '.join(sorted(unknown))[:200]}")
    for name, f in known.items():
        if name not in raw:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(f"{where}: plan.{name} is missing")
            continue
        value, want = raw[name], str(f.type)
        ok = (value is None and "None" in want) or _type_ok(value, want)
        if not ok:
            raise ConfigError(f"{where}: plan.{name} has the wrong type ({type(value).__name__})")


def _type_ok(value: Any, want: str) -> bool:
    if want.startswith("tuple"):
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if want.startswith("bool"):
        return isinstance(value, bool)
    if want.startswith("int"):
        return isinstance(value, int) and not isinstance(value, bool)
    if want.startswith("float"):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if want.startswith("str"):
        return isinstance(value, str)
    return True


def _inside_or_refuse(artifact: Path, rel: Any, what: str) -> None:
    from slm_export.integrity import inside

    if rel is not None and not inside(artifact, rel):
        raise ConfigError(f"{artifact}/report.json names {rel!r} as {what}, which is not inside the artifact folder; "
                          "validate runs only the artifact's own files")


def revalidate(artifact: str | Path, eval_data: str | None = None, progress: Progress | None = None,
               settings: ValidationSettings | None = None, emulate: str | None = None) -> RunResult:
    """Check the artifact's files against its manifest, then re-run validation (and its cross-checks, emulated
    and device runs) on them and rewrite its reports (atomically, file by file). ``emulate`` overrides the
    artifact's plan ("on", "off")."""
    from slm_export.models import load_model

    artifact = Path(artifact).absolute()
    manifest = load_manifest(artifact)
    report_path = artifact / "report.json"
    old = parse_report(report_path.read_bytes(), str(report_path)) if report_path.is_file() else {}
    plan, profile = _plan_of(old, manifest, artifact, eval_data, emulate)
    ran, backends = _runnable(artifact, old)
    notes = _integrity_notes(artifact, manifest)
    stages = Stages(progress)
    source = manifest["source_model"]
    model = stages.run("load", lambda: load_model(source), lambda m: m.weight_bytes)
    if model.fingerprint != manifest["fingerprint"]:
        raise ConfigError(f"the model at {source} changed since {artifact} was exported "
                          "(fingerprint differs); export again")
    if isinstance(manifest.get("model_name"), str):  # the name the export reported, not the absolute path
        model = replace(model, name=manifest["model_name"])
    settings = settings or ValidationSettings()
    metrics = stages.run("validate", lambda: validate_file(model, artifact / ran, plan, settings, progress))
    results = _results(backends)
    runs: dict[str, list[dict[str, Any]]] = {}
    if model.kind == "decoder" and results:
        metrics.update(further_runs(model, artifact, results, ran, plan, profile, settings, stages, runs, progress))
    report = build_report(plan, profile, model, _exported(artifact / ran, manifest, old), results, metrics,
                          old.get("stages", []) + stages.records, settings.goals_file, validated_file=ran,
                          compression=old.get("compression"), runs=Runs.from_map(runs), sparsity=old.get("sparsity"),
                          notes=notes, roofline=old.get("roofline"), backends=backends or None)
    report = replace(report, output=old.get("output"), integrity=old.get("integrity"))
    _rewrite_reports(artifact, report, manifest)
    data = report.to_dict()
    if report.verdict == "FAIL":
        raise ValidationFailed(failed_message(data), data)
    return RunResult(data, artifact)


def _plan_of(old: dict[str, Any], manifest: dict[str, Any], artifact: Path, eval_data: str | None,
             emulate: str | None) -> tuple[Plan, TargetProfile]:
    from slm_export.preflight import check_inputs
    from slm_export.targets import get_target

    old_plan = old.get("plan", {})
    origin = old.get("target", {}).get("origin", "built-in")
    profile = get_target(old_plan.get("target", "host")) if origin == "built-in" else get_target(target_file=origin)
    plan = Plan.from_dict({**old_plan, "eval_data": eval_data, "validate": True}) if old_plan \
        else make_plan(profile, manifest["source_model"], artifact, manifest["precision"], eval_data)
    if eval_data is not None:
        check_inputs(plan)
    return (replace(plan, emulate=emulate) if emulate else plan), profile


def _runnable(artifact: Path, old: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The file the report says was validated and the backends' records, every file they name inside the
    artifact (a report naming anything else is refused)."""
    from slm_export.exporters.onnx import MODEL_FILE

    ran = old.get("validated_file") or MODEL_FILE
    _inside_or_refuse(artifact, ran, "the file it validated")
    backends = old.get("backends", [])
    for b in backends:
        for key in ("runtime_model", "device_model"):
            _inside_or_refuse(artifact, b.get(key), f"the {b.get('backend')} {key.replace('_', ' ')}")
        for f in b.get("files", []) if isinstance(b.get("files"), list) else ["?"]:
            _inside_or_refuse(artifact, f, f"a {b.get('backend')} file")
    return ran, backends


def _integrity_notes(artifact: Path, manifest: dict[str, Any]) -> list[str]:
    from slm_export.integrity import unlisted

    if "integrity" not in manifest:
        return ["this artifact has no integrity record (exported by an older version): its files were not checked "
                "against their export-time hashes"]
    extra = unlisted(artifact, manifest)
    return [f"files not written by the export, not run: {', '.join(extra[:5])}"] if extra else []


def _results(backends: list[dict[str, Any]]) -> list[Any]:
    from slm_export.backends import CompileResult

    known = {f.name for f in fields(CompileResult)}
    return [CompileResult(**{k: (tuple(v) if k == "files" else v) for k, v in b.items() if k in known})
            for b in backends]


def _exported(path: Path, manifest: dict[str, Any], old: dict[str, Any]) -> Any:
    from slm_export.exporters.onnx import ExportResult

    return ExportResult(path, tuple(manifest["files"]), old.get("artifact", {}).get("bytes", 0),
                        old.get("roofline", {}).get("weight_bytes_read_per_token", 0), 0,
                        manifest["graph_ops"], manifest["opset"])


def _rewrite_reports(artifact: Path, report: Report, manifest: dict[str, Any]) -> None:
    """Replace the reports file by file (each rename atomic), then seal their new hashes into the manifest."""
    from slm_export.integrity import reseal_reports
    from slm_export.report import REPORT_FILES

    tmp = artifact / f".report.partial-{os.getpid()}"
    tmp.mkdir()
    try:
        write_report(report, tmp)
        for name in REPORT_FILES:
            (tmp / name).replace(artifact / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    reseal_reports(artifact, manifest)
