"""``slm-export matrix MATRIX.toml``: every cell of models x targets x precisions x methods as its own export,
on a Ray cluster, then one comparison report (docs/matrix.md).

The order keeps a user's mistake cheap: the file is read and every cell planned (its options checked, its
folder checked) before Ray starts or any cell runs; cells whose inputs and artifact are unchanged are skipped;
the rest run as Ray tasks; the comparison report is written last, also when cells failed.

Exit code: the worst of the cells' (0 passed or skipped, 1 goals missed, a failed cell's own code: 2 a user
error found only at run time, 3 environment or a worker that died, 4 an internal bug).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from slm_export.errors import ConfigError
from slm_export.matrix.cells import CellJob, changed_inputs, check_names, earlier_result, plan_cell
from slm_export.matrix.compare import MARKER, REPORTS, rows_of, write_reports
from slm_export.matrix.spec import MatrixSpec, read_matrix

Say = Callable[[str], None]


@dataclass(frozen=True)
class MatrixResult:
    out: Path
    rows: list[dict[str, Any]]
    exit_code: int


def plan_matrix(path: str | Path, out: str | Path | None = None) -> tuple[MatrixSpec, Path, list[CellJob]]:
    """Read the file and plan every cell; any refusal is a ``ConfigError`` (or another exit-2 error) here."""
    spec = read_matrix(path)
    folder = Path(out).expanduser().resolve() if out else spec.out
    if folder is None:
        raise ConfigError(f"{spec.source}: no out folder: give --out or out = \"...\" in the file")
    check_matrix_out(folder)
    hashes: dict[str, str] = {}
    jobs = [plan_cell(cell, folder, hashes) for cell in spec.cells]
    check_names(jobs)
    return spec, folder, jobs


def check_matrix_out(folder: Path) -> None:
    """The matrix writes inside its out folder, never replaces it: it must be absent, empty, or a matrix's."""
    import json

    from slm_export import output

    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"the matrix's out folder {folder} exists and is not a folder")
    if output.is_our_artifact(folder):
        raise ConfigError(f"{folder} is one export's artifact; a matrix needs a folder of its own for its cells")
    if not folder.is_dir() or not os.listdir(folder):
        return
    try:
        ours = json.loads((folder / "matrix.json").read_text(encoding="utf-8")).get("tool") == MARKER
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ConfigError(f"{folder} holds files and is not a matrix's out folder (no matrix.json of this tool); "
                          "choose another out folder or empty it")


def run_matrix(path: str | Path, out: str | Path | None = None, ray_address: str | None = None,
               say: Say | None = None, rerun: bool = False) -> MatrixResult:
    """Plan, skip what is unchanged, run the rest on Ray, write the comparison report."""
    from slm_export.matrix.cluster import import_ray

    say = say or (lambda line: None)
    spec, folder, jobs = plan_matrix(path, out)
    for note in sorted({n for job in jobs for n in job.ignored}):
        say(f"warning: {note}")
    earlier = {job.name: None if rerun else earlier_result(job) for job in jobs}
    todo = [job for job in jobs if earlier[job.name] is None]
    if todo:
        import_ray()  # not installed: exit 3 before the out folder is made
    folder.mkdir(parents=True, exist_ok=True)
    for job in jobs:
        if earlier[job.name] is not None:
            say(f"{job.name}: skipped (inputs and artifact unchanged)")
        elif changed := changed_inputs(job):
            say(f"{job.name}: runs again ({', '.join(changed)} changed)")
    ran = _run_on_ray(todo, ray_address, say) if todo else {}
    results = [earlier[job.name] or ran[job.name] for job in jobs]
    code = exit_code(results)
    rows = rows_of(results, folder)
    write_reports(folder, str(spec.source), rows, code)
    say(f"comparison: {folder / REPORTS[1]} and {folder / REPORTS[2]}")
    return MatrixResult(folder, rows, code)


def _run_on_ray(jobs: list[CellJob], address: str | None, say: Say) -> dict[str, dict[str, Any]]:
    from slm_export.matrix.cluster import cell_threads, cluster, run_all

    with cluster(address) as ray:
        asked = {job.name: job.settings.threads for job in jobs}
        fair, biggest = cell_threads(ray, len(jobs), None)
        jobs = [replace(job, settings=replace(job.settings, threads=min(asked[job.name], biggest) if
                                              asked[job.name] else fair)) for job in jobs]
        say(f"{len(jobs)} cell(s) on Ray, {fair} thread(s) each unless set")

        def done(r: dict[str, Any]) -> None:
            tail = f": {r['message']}" if r["status"] == "failed" else ""
            say(f"{r['cell']}: {r['status']} ({r['seconds']:.1f} s){tail}")

        return {r["cell"]: r for r in run_all(ray, jobs, done)}


def exit_code(results: list[dict[str, Any]]) -> int:
    """The worst cell's: 0 passed or skipped, 1 goals missed, a failed cell's own code."""
    return max((int(r["exit_code"]) for r in results), default=0)


__all__ = ["MatrixResult", "check_matrix_out", "exit_code", "plan_matrix", "run_matrix"]
