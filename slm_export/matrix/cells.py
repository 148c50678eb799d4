"""A matrix cell from plan to result: its plan made before any cell runs, the hash of its inputs, whether an
earlier run's artifact can stand in for it, and the export itself as a worker runs it.

A cell's inputs are the content of its model's files, the resolved target profile, the resolved options (the
plan without its folder, and the validation settings without the thread count, which changes timings, not
the artifact), the content of the text and goals files the options name, and the versions of the tool and of
the libraries that write the artifact (torch, transformers, ONNX, ONNX Runtime). Their hash is written into
the artifact (``matrix-cell.json``) before it is sealed, so ``integrity.verify`` covers it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from slm_export import output
from slm_export.errors import ConfigError, SlmExportError, ValidationFailed
from slm_export.matrix.spec import Cell, safe_name

CELL_FILE = "matrix-cell.json"
STATUSES = ("passed", "goals missed", "failed", "skipped")
UNHASHED_SETTINGS = ("threads",)


@dataclass(frozen=True)
class CellJob:
    """What a worker needs to run one cell: all plain, picklable data."""

    name: str
    label: str
    plan: Any  # Plan
    profile: Any  # TargetProfile
    settings: Any  # ValidationSettings
    inputs: dict[str, str]  # the hash of each kind of input
    ignored: tuple[str, ...] = ()

    @property
    def inputs_sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.inputs, sort_keys=True).encode()).hexdigest()

    def record(self) -> str:
        return json.dumps({"cell": self.name, "inputs_sha256": self.inputs_sha256, "inputs": self.inputs},
                          indent=2, sort_keys=True) + "\n"


def plan_cell(cell: Cell, out: Path, model_hashes: dict[str, str]) -> CellJob:
    """The cell's plan, checked as ``export`` checks its flags; a refusal names the cell (exit 2)."""
    from slm_export.planning import IGNORED, make_plan
    from slm_export.targets import get_target
    from slm_export.validation.validate import ValidationSettings

    try:
        is_file = cell.target.endswith(".toml")
        profile = get_target(None if is_file else cell.target, cell.target if is_file else None)
        options = {k: v for k, v in cell.plan.items() if k not in ("eval_data", "validate")}
        method = {"method": cell.method} if cell.method else {}
        folder = out / _provisional(cell, profile.id)
        plan = make_plan(profile, cell.model.ref, folder, cell.precision, cell.plan.get("eval_data"),
                         cell.plan.get("validate", True), **options, **method)
        settings = ValidationSettings(**cell.settings)
        if settings.goals_file:
            from slm_export.goals import load_goals

            load_goals(settings.goals_file)
    except SlmExportError as exc:
        raise type(exc)(f"cell {cell.label}: {exc}") from None
    name = safe_name(f"{cell.model.name}-{profile.id}-{plan.precision}" + (f"-{plan.method}" if plan.method and
                                                                           plan.quantized else ""))
    plan = replace(plan, out=str(out / name))
    try:  # the cell's own folder, now that it has its name: absent, empty or an artifact of this tool
        output.check_out(output.resolve_out(plan.out), plan.force, (plan.model, plan.eval_data, plan.calib_data))
    except SlmExportError as exc:
        raise type(exc)(f"cell {cell.label}: {exc}") from None
    if cell.model.ref not in model_hashes:
        model_hashes[cell.model.ref] = model_hash(cell.model.ref)
    inputs = inputs_of(plan, profile, settings, model_hashes[cell.model.ref])
    ignored = tuple(n[len(IGNORED):] for n in plan.notes if n.startswith(IGNORED))
    return CellJob(name, cell.label, plan, profile, settings, inputs, ignored)


def _provisional(cell: Cell, target: str) -> str:
    return safe_name(f"{cell.model.name}-{target}-{cell.precision}-{cell.method or 'default'}")


def inputs_of(plan: Any, profile: Any, settings: Any, model: str) -> dict[str, str]:
    """The hash of each kind of input; equal hashes mean the export would be the same run."""
    from slm_export.report import versions

    # the tool and the libraries that write the artifact, as the report records them (not this machine's name)
    tool = {k: v for k, v in versions().items() if k not in ("python", "machine")}
    options = {k: v for k, v in plan.to_dict().items() if k not in ("out", "notes", "force")}
    kept = {k: v for k, v in asdict(settings).items() if k not in UNHASHED_SETTINGS}
    files = {name: content_hash(p) for name in ("eval_data", "calib_data", "goals_file")
             if isinstance(p := options.get(name, kept.get(name)), str) and Path(p).exists()}
    return {"model": model, "profile": _json_hash(profile.to_dict()), "options": _json_hash([options, kept]),
            "files": _json_hash(files), "tool": _json_hash(tool)}


def _json_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def model_hash(ref: str) -> str:
    """The content of a model's files (a built-in's packaged folder, a local file or folder); a hub id by its
    name and revision (pin ``@revision`` for a re-run to follow the Hub)."""
    from slm_export.models.builtin import BUILTIN_MODELS

    path = Path(ref).expanduser()
    if not path.exists() and ref in BUILTIN_MODELS:
        path = BUILTIN_MODELS.get(ref).path()
    if not path.exists():
        return "name:" + ref
    return content_hash(path)


def content_hash(path: str | Path) -> str:
    """sha256 over a file's bytes, or over a folder's files (relative name and bytes, in name order)."""
    from slm_export.integrity import sha256_file

    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(p.relative_to(path).as_posix().encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


def earlier_result(job: CellJob) -> dict[str, Any] | None:
    """The result of an earlier run that this one would repeat: its artifact holds this cell's inputs hash and
    every file it recorded is unchanged. None when the cell must run."""
    from slm_export import integrity

    folder = Path(job.plan.out)
    try:
        record = json.loads((folder / CELL_FILE).read_text(encoding="utf-8"))
        if record.get("inputs_sha256") != job.inputs_sha256:
            return None
        integrity.verify(folder)
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, AttributeError, SlmExportError):
        return None
    verdict = report.get("verdict") if isinstance(report, dict) else None
    # a skipped cell whose artifact missed its goals still counts as missed: re-running changes nothing
    return result(job, "skipped", 1 if verdict == "FAIL" else 0,
                  f"unchanged since the earlier run ({verdict})", folder, 0.0, verdict)


def changed_inputs(job: CellJob) -> list[str]:
    """Which kinds of input differ from the earlier run's record (for the progress line)."""
    try:
        record = json.loads((Path(job.plan.out) / CELL_FILE).read_text(encoding="utf-8"))
        before = record["inputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [k for k, v in job.inputs.items() if before.get(k) != v]


def result(job: CellJob, status: str, code: int, message: str, folder: Path | None, seconds: float,
           verdict: str | None = None) -> dict[str, Any]:
    """A cell's outcome, plain data: what the comparison report reads."""
    return {"cell": job.name, "label": job.label, "target": job.plan.target, "model": job.plan.model,
            "precision": job.plan.precision, "method": job.plan.method if job.plan.quantized else None,
            "status": status, "exit_code": code, "message": message,
            "folder": str(folder) if folder is not None else None, "seconds": round(seconds, 2), "verdict": verdict}


def run_cell(job: CellJob) -> dict[str, Any]:
    """Run one cell's export (in a worker process); every error becomes the cell's result, never a raise, so
    a failed cell leaves the others running. The pipeline removes a failed cell's partial folder."""
    from slm_export.pipeline import run

    start = time.perf_counter()
    try:
        got = run(job.plan, job.profile, None, job.settings, extra_files={CELL_FILE: job.record()})
        verdict = got.report.get("verdict")
        return result(job, "passed", 0, verdict or "", got.out, time.perf_counter() - start, verdict)
    except ValidationFailed as exc:
        report = exc.report or {}
        folder = (report.get("output") or {}).get("folder")
        status = "goals missed" if folder else "failed"
        return result(job, status, exc.exit_code, str(exc), Path(folder) if folder else None,
                      time.perf_counter() - start, report.get("verdict"))
    except SlmExportError as exc:
        return result(job, "failed", exc.exit_code, str(exc), None, time.perf_counter() - start)
    except Exception as exc:  # an internal bug in one cell: reported with the others, not a lost matrix
        return result(job, "failed", 4, f"internal error ({type(exc).__name__}): {exc}", None,
                      time.perf_counter() - start)


def check_names(jobs: list[CellJob]) -> None:
    """Two cells may not share a folder (a target named by alias and by id, say)."""
    seen: dict[str, str] = {}
    for job in jobs:
        if job.name in seen:
            raise ConfigError(f"cells {seen[job.name]} and {job.label} would both write {job.name}: name each target "
                              "and method once")
        seen[job.name] = job.label
