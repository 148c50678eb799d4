#!/usr/bin/env python
"""Issue-33 figure: a matrix of 8 tiny-model cells on a local Ray cluster of this machine against the same 8
cells one after another in one process.

Both sides start from a fresh process (``slm_export.bench.in_fresh_process``: the interpreter, the imports and,
for Ray, the cluster's start and its workers' imports all count), plan the same matrix file and write their own
folders. Sequential: each cell's export with every core (``--threads`` = the machine's cores). Ray:
``run_matrix``, cells side by side with a fair share of the cores each. Prints both walls and their ratio
(the issue's target: at most 1.2), and what the Ray side spent before and around its cells.

Usage: python scripts/bench_matrix.py [--work DIR] [--rounds 1] [--seq-threads 0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("llama", "qwen2")
MATRIX = """out = "unused"
models = [{models}]
targets = ["host"]
precisions = ["fp32", "fp16", "int8", "int4"]
methods = {{ int8 = ["rtn"], int4 = ["rtn"] }}

[options]
eval-windows = 2
timing-tokens = 16
"""


def sequential(matrix: str, out: str, threads: int) -> dict[str, Any]:
    """Every cell in this process, in order, each with ``threads`` threads (0: all the cores)."""
    from slm_export.matrix import plan_matrix
    from slm_export.matrix.cells import run_cell
    from slm_export.matrix.cluster import machine_cpus

    _, _, jobs = plan_matrix(matrix, out)
    cpus = threads or machine_cpus()
    rows = [run_cell(replace(job, settings=replace(job.settings, threads=cpus))) for job in jobs]
    return {"cells": [(r["cell"], r["status"], r["seconds"]) for r in rows]}


def on_ray(matrix: str, out: str) -> dict[str, Any]:
    """The matrix command's own path: plan, local Ray cluster, cells as tasks, comparison report."""
    from slm_export.matrix import run_matrix

    t = time.perf_counter()
    done = run_matrix(matrix, out, rerun=True)
    return {"cells": [(r["cell"], r["status"], r["seconds"]) for r in done.rows],
            "in_process_s": time.perf_counter() - t}


def ray_start() -> dict[str, float]:
    """A bare local cluster's start and stop, and one trivial task's first round trip (a worker's start)."""
    import ray

    from slm_export.matrix.cluster import cluster, machine_cpus

    t = time.perf_counter()
    with cluster(None) as r:
        started = time.perf_counter()
        r.get(r.remote(num_cpus=1)(machine_cpus).remote())  # a function workers can import
        first_task = time.perf_counter()
    return {"init_s": started - t, "first_task_s": first_task - started, "shutdown_s": time.perf_counter() - first_task,
            "ray": ray.__version__}


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    from slm_export.bench import in_fresh_process

    t = time.perf_counter()
    got = in_fresh_process(fn, *args)
    return time.perf_counter() - t, got


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", help="folder for the models and outputs (default: a temporary one)")
    ap.add_argument("--seq-threads", type=int, default=0, help="threads of each sequential cell (default 0: all cores)")
    ap.add_argument("--rounds", type=int, default=1, help="sequential then Ray, this many times; medians reported")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp).resolve()
        from tests.conftest import make_tiny_model

        models = [make_tiny_model(a, work / "models" / f"tiny-{a}") for a in MODELS]
        matrix = work / "matrix.toml"
        matrix.write_text(MATRIX.format(models=", ".join(json.dumps(str(m)) for m in models)))
        seq, ray_, cells = [], [], None
        for i in range(args.rounds):
            s, got = timed(sequential, str(matrix), str(work / f"seq-{i}"), args.seq_threads)
            r, rgot = timed(on_ray, str(matrix), str(work / f"ray-{i}"))
            seq.append(s)
            ray_.append(r)
            cells = (got["cells"], rgot["cells"])
            print(f"round {i + 1}: sequential {s:.1f} s, ray {r:.1f} s, ratio {r / s:.2f}", file=sys.stderr)
        _, start = timed(ray_start)
    bad = [c for c in cells[0] + cells[1] if c[1] != "passed"]
    s, r = statistics.median(seq), statistics.median(ray_)
    print(f"cells: {len(cells[0])} ({', '.join(c[0] for c in cells[0])})")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end")
    each = f"{args.seq_threads} thread(s)" if args.seq_threads else "all cores"
    print(f"sequential (one process, {len(cells[0])} cells, {each} each): cell seconds "
          f"{[c[2] for c in cells[0]]}")
    print(f"ray cells (side by side, first per worker includes its imports): cell seconds {[c[2] for c in cells[1]]}")
    print(f"ray {start['ray']}: local cluster start {start['init_s']:.1f} s, first task on a new worker "
          f"{start['first_task_s']:.1f} s, shutdown {start['shutdown_s']:.1f} s")
    print(f"sequential_wall_s {s:.1f}")
    print(f"ray_wall_s {r:.1f}")
    print(f"ratio {r / s:.2f} (target <= 1.2)")
    if bad:
        print(f"cells that did not pass: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
