"""``python -m slm_runner JOB.json RESULT.json``: run a validation job where the artifact runs.

Paths in the job are relative to the job file's folder unless absolute. The result is written to a
temporary name and renamed, so a killed run never leaves a half-written result. Exit codes: 0 done,
2 bad job, 3 the runtime is missing or failed (the result then holds ``ok: false`` and the error).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

SCHEMA = 1  # of the job and result files; job.py says the same


def _write(path: Path, data: dict) -> None:  # type: ignore[type-arg]
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m slm_runner JOB.json RESULT.json", file=sys.stderr)
        return 2
    job_path, result_path = Path(argv[0]), Path(argv[1])
    try:
        job = json.loads(job_path.read_text())
    except (OSError, ValueError) as exc:
        print(f"slm_runner: cannot read the job {job_path}: {exc}", file=sys.stderr)
        return 2
    try:  # NumPy and the runtime are the far side's to provide: say which is missing, as a result
        from .job import run_job
    except ImportError as exc:
        _write(result_path, {"schema": SCHEMA, "ok": False, "kind": "runtime-missing", "error": str(exc)})
        print(f"slm_runner: {exc}", file=sys.stderr)
        return 3
    if job.get("schema") != SCHEMA:
        print(f"slm_runner: job schema {job.get('schema')} is not {SCHEMA}: the runner and the tool differ in "
              "version", file=sys.stderr)
        return 2
    try:
        result = run_job(job, job_path.parent)
    except ImportError as exc:
        _write(result_path, {"schema": SCHEMA, "ok": False, "kind": "runtime-missing", "error": str(exc)})
        print(f"slm_runner: the artifact's runtime is missing here: {exc}", file=sys.stderr)
        return 3
    except Exception as exc:  # the runtime failed on this artifact: report it whole, the host decides
        _write(result_path, {"schema": SCHEMA, "ok": False, "kind": "runtime-failed",
                             "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-4000:]})
        print(f"slm_runner: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 3
    _write(result_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
