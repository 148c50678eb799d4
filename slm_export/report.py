"""The report: one typed object built here from what the stages returned, written as ``report.json`` (stable keys,
schema version), ``report.md`` and ``report.html``. Nothing edits a report after it is built: placing the artifact
and sealing its files make new reports (``placed``, ``sealed``)."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from slm_export import goals as goal_rules
from slm_export.energy import energy_metrics

SCHEMA_VERSION = 1
OPTIONAL = ("sparsity", "output", "integrity")  # keys present only when the run had them


@dataclass(frozen=True)
class Report:
    """Every section of ``report.json``, in its order."""

    schema_version: int
    verdict: str
    notes: list[str]
    target: dict[str, Any]
    model: dict[str, Any]
    plan: dict[str, Any]
    artifact: dict[str, Any]
    compile: dict[str, Any]
    stages: list[dict[str, Any]]
    metrics: dict[str, Any]
    goals: list[dict[str, Any]]
    roofline: dict[str, Any]
    versions: dict[str, str]
    created: str
    backends: list[dict[str, Any]] = field(default_factory=list)
    validated_file: str | None = None
    compression: dict[str, Any] | None = None
    crosschecks: list[dict[str, Any]] = field(default_factory=list)
    emulation: list[dict[str, Any]] = field(default_factory=list)
    device: list[dict[str, Any]] = field(default_factory=list)
    sparsity: dict[str, Any] | None = None
    output: dict[str, Any] | None = None
    integrity: dict[str, Any] | None = None
    # which runtime loads which file: {"file", "runtime", "status", "detail"} rows (validation/loads.py)
    runtime_loads: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in data.items() if not (k in OPTIONAL and v is None)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """A report read back (``validate``): sections a report of an older version lacks take their defaults."""
        names = {f.name for f in fields(cls)}
        base = {"schema_version": SCHEMA_VERSION, "verdict": "NOT VALIDATED", "notes": [], "target": {}, "model": {},
                "plan": {}, "artifact": {}, "compile": {}, "stages": [], "metrics": {}, "goals": [], "roofline": {},
                "versions": {}, "created": ""}
        return cls(**{**base, **{k: v for k, v in data.items() if k in names}})

    @property
    def passed(self) -> bool:
        return self.verdict in ("PASS", "NO GOALS")

    def placed(self, output: dict[str, Any], notes: list[str]) -> Report:
        """This report with where its artifact went (and the notes that says)."""
        return replace(self, output=output, notes=[*self.notes, *notes])

    def sealed(self, integrity: dict[str, Any]) -> Report:
        """This report with the record of the files hashed into the manifest."""
        return replace(self, integrity=integrity)


@dataclass(frozen=True)
class Runs:
    """What validation measured beyond the validated file: cross-checks, emulated and device runs, and which
    runtime loads which file."""

    crosschecks: list[dict[str, Any]] = field(default_factory=list)
    emulation: list[dict[str, Any]] = field(default_factory=list)
    device: list[dict[str, Any]] = field(default_factory=list)
    loads: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_map(cls, runs: dict[str, list[dict[str, Any]]]) -> Runs:
        return cls(runs.get("crosscheck", []), runs.get("emulate", []), runs.get("device", []),
                   runs.get("loads", []))


def build_report(plan: Any, profile: Any, model: Any, exported: Any, results: list[Any], metrics: dict[str, Any],
                 stages: list[dict[str, Any]], goals_file: str | None = None, *, validated_file: str | None = None,
                 compression: dict[str, Any] | None = None, runs: Runs | None = None,
                 sparsity: dict[str, Any] | None = None, notes: list[str] | None = None,
                 roofline: dict[str, Any] | None = None, backends: list[dict[str, Any]] | None = None,
                 memory: dict[str, Any] | None = None) -> Report:
    """The report of a run (or of ``validate``, which passes the sections it keeps from the export); ``memory``:
    the peak predicted before the load (``memory.Prediction.to_dict``)."""
    from slm_export.validation.validate import peak_rss_mb

    roof = roofline if roofline is not None else estimate(plan, profile, model, exported)
    metrics = {**metrics, **fractions_of_roofline(profile, roof, metrics)}
    wanted = goal_rules.choose(model.kind, plan, metrics, goals_file)
    judged, verdict = goal_rules.judge(wanted, metrics)
    # Energy is information beside the goals: an estimate alone (no validation) is no measured run to judge.
    metrics = {**metrics, **energy_metrics(profile, metrics, roof, model.kind)}
    folder = Path(exported.model_path).parent
    artifact_bytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    metrics = {**metrics,
               "artifact_bytes": {"value": artifact_bytes, "unit": "bytes", "where": "artifact folder"},
               "peak_rss_mb": {"value": peak_rss_mb(), "unit": "MB",
                               "where": "measured on host: whole run (load, export, validation) in one process"}}
    if memory is not None:
        stages_mb = ", ".join(f"{k} {v}" for k, v in memory["stages_mb"].items())
        metrics["predicted_peak_rss_mb"] = {"value": memory["peak_mb"], "unit": "MB",
                                            "where": f"predicted before the load from the model's shapes and the "
                                                     f"plan ({'streamed' if memory['streamed'] else 'held'}; "
                                                     f"stages, MB: {stages_mb})"}
    runs = runs or Runs()
    compiled = results[0] if results else None
    return Report(
        schema_version=SCHEMA_VERSION, verdict=verdict, notes=[*plan.notes, *(notes or [])],
        target={"id": profile.id, "name": profile.name, "origin": profile.origin},
        model={"name": model.name, "path": model.path, "format": model.fmt, "kind": model.kind,
               "architecture": model.model_type, "fingerprint": model.fingerprint,
               "float32_weight_bytes": model.weight_bytes, "hub": _hub(model)},
        plan=plan.to_dict(), artifact={"files": list(exported.files), "bytes": exported.bytes,
                                       "graph_ops": exported.graph_ops, "opset": exported.opset},
        compile=asdict(compiled) if compiled is not None else {"backend": plan.backend, "status": "not run"},
        stages=stages, metrics=metrics, goals=judged, roofline=roof, versions=versions(),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        backends=backends if backends is not None else [asdict(r) for r in results],
        validated_file=validated_file, compression=compression, crosschecks=runs.crosschecks,
        emulation=runs.emulation, device=runs.device, sparsity=sparsity, runtime_loads=runs.loads)


def _hub(model: Any) -> dict[str, Any] | None:
    """The repository, revision asked for and commit of a model loaded by hub id; ``None`` for a path or name."""
    source = getattr(model, "hub", None)
    return source.to_dict() if source is not None else None


def estimate(plan: Any, profile: Any, model: Any, exported: Any) -> dict[str, Any]:
    """What the target should reach: its roofline from the profile's bandwidth and compute (decoders only)."""
    if model.kind != "decoder":
        return {}
    est = profile.roofline(exported.weight_bytes_per_token, exported.flops_per_token, plan.precision)
    return {f"{profile.id}_decode_tokens_per_s_bound": est["decode_tokens_per_s"],
            f"{profile.id}_prefill_tokens_per_s_bound": est["prefill_tokens_per_s"],
            "weight_bytes_read_per_token": exported.weight_bytes_per_token,
            "bandwidth_gbs": est["bandwidth_gbs"], "peak_gflops": est["peak_gflops"],
            "source": f"{profile.id} profile: memory.bandwidth_gbs, compute.{plan.precision}"}


def fractions_of_roofline(profile: Any, roof: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """A device's measured decode rate over the target's bound; on the host, the host's own over its bound."""
    bound = roof.get(f"{profile.id}_decode_tokens_per_s_bound")
    out: dict[str, Any] = {}
    if not bound:
        return out
    if "device_decode_tokens_per_s_p50" in metrics:
        measured = metrics["device_decode_tokens_per_s_p50"]
        out["device_decode_fraction_of_roofline"] = {
            "value": measured["value"] / bound, "unit": "", "where": f"{measured['where']}, over the {profile.id} "
            f"profile's roofline bound ({bound:.1f} tokens/s, estimated)"}
    if profile.id == "host" and "decode_tokens_per_s_p50" in metrics:
        measured = metrics["decode_tokens_per_s_p50"]
        out["decode_fraction_of_roofline"] = {
            "value": measured["value"] / bound, "unit": "", "where": f"{measured['where']}, over the host's "
            f"roofline bound ({bound:.1f} tokens/s: measured bandwidth / weight bytes read per token)"}
    return out


def compression_section(result: Any, eval_ppl_change: float | None = None) -> dict[str, Any] | None:
    """The compress stage's record; an accuracy budget's entry gains the evaluation figure it reached."""
    if result is None:
        return None
    layers = sorted(result.layers, key=lambda e: e.get("output_sqnr_db", e["weight_sqnr_db"]))
    budget = result.budget
    if budget is not None and eval_ppl_change is not None:
        budget = {**budget, "eval_ppl_change_pct": eval_ppl_change}
    return {"calibration": result.calibration, "seconds": result.seconds, "bits_per_weight": result.bits_per_weight,
            "notes": result.notes, "layers": result.layers, "budget": budget, "tuning": result.tuning,
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


def write_report(report: Report | dict[str, Any], out_dir: Path) -> None:
    """Write ``report.json``, ``report.md`` and ``report.html`` into ``out_dir``."""
    from slm_export.report_html import render_html
    from slm_export.report_md import render_markdown

    data = report.to_dict() if isinstance(report, Report) else report
    (out_dir / "report.json").write_text(json.dumps(data, indent=2, default=str))
    (out_dir / "report.md").write_text(render_markdown(data))
    (out_dir / "report.html").write_text(render_html(data))


REPORT_FILES = ("report.json", "report.md", "report.html")
