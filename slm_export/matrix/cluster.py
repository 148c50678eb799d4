"""The matrix's cells on a Ray cluster: a local one started for the run (no set-up), or an existing one.

Each cell is a Ray task in a worker process of its own, so a cell that crashes or runs out of memory takes
down only its worker; the driver reports it as that cell's failure and the others go on. A task asks Ray for
as many CPUs as its cell's threads, so the cells that run side by side share the cores instead of fighting
for them. Workers are reused from cell to cell: the imports (torch, ONNX Runtime) are paid once per worker.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from slm_export.errors import DeviceError
from slm_export.matrix.cells import CellJob, result, run_cell

INSTALL = "pip install 'slm-export[matrix]' (or pip install ray==2.60.0)"


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise DeviceError(f"`slm-export matrix` runs its cells on Ray, which is not installed: {INSTALL}") from None
    return ray


def machine_cpus() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextmanager
def cluster(address: str | None) -> Iterator[Any]:
    """Ray, connected: to ``address``, or to a local cluster of this machine's cores started here (and stopped
    at the end). A Ray already initialised in this process (a test's, a notebook's) is used as it is."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    # No dashboard, no worker logs streamed to the terminal (a cell's result carries its error), Ray's own
    # logging at warnings: the matrix's progress lines are the output.
    # Ray's note that it enabled token authentication for the local cluster: its default, nothing to act on.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING,
             "configure_logging": True}
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=machine_cpus(), **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise DeviceError(f"could not start or reach {where}: {exc}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def cell_threads(ray: Any, cells: int, asked: int | None) -> tuple[int, int]:
    """(threads per cell, the most CPUs one node has). Asked for: as given, at most a node's cores; else a fair
    share: the cores divided among the cells that can run at once."""
    nodes = [n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    biggest = int(max(nodes, default=1)) or 1
    total = int(sum(nodes)) or 1
    if asked:
        return min(asked, biggest), biggest
    return max(1, min(biggest, total // max(1, min(cells, total)))), biggest


def run_all(ray: Any, jobs: list[CellJob], done: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    """Every job as a Ray task (CPUs = its threads); ``done`` is called as each finishes, in finishing order.
    Results come back in the jobs' order. Ctrl-C cancels the tasks still running."""
    remote = ray.remote(max_retries=0)(run_cell)
    refs = {remote.options(num_cpus=max(1, job.settings.threads), name=f"cell:{job.name}").remote(job): job
            for job in jobs}
    results: dict[str, dict[str, Any]] = {}
    pending = list(refs)
    try:
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            job = refs[finished[0]]
            results[job.name] = _outcome(ray, finished[0], job)
            done(results[job.name])
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return [results[job.name] for job in jobs]


def _outcome(ray: Any, ref: Any, job: CellJob) -> dict[str, Any]:
    """The cell's own result, or its worker's death (a crash, the memory monitor) as that cell's failure."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return result(job, "failed", 3, f"its worker process died ({type(exc).__name__}): {first}", None, 0.0)
