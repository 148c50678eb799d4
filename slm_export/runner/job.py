"""Run one validation job against an artifact file and return plain JSON-able results.

A job names the artifact's runtime file, the token windows to score, a prompt for a greedy
continuation and a prompt for timing. The result holds, per window, the summed negative
log-likelihood of the next tokens and the argmax of every position (so the host can compute
perplexity and top-1 agreement against its own reference without shipping logits), the greedy tokens,
and the time to first token and decode rate of each repeat, with the environment that produced them.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = 1  # of the job and result files (__main__.py says the same, before NumPy is imported)


def open_runtime(path: Path, threads: int = 0, exact_qdq: bool = False,
                 ort_config: dict[str, str] | None = None) -> tuple[Any, dict[str, str]]:
    """The decoder for an artifact file, by its suffix, and the runtime's name and version: an ExecuTorch
    program (``.pte``), a TVM library (``.so``), a GGUF through llama.cpp (``.gguf``) or, for anything else,
    an ONNX Runtime session (``make_session``). The one place the runner and the host's validation open an
    artifact."""
    if path.suffix == ".gguf":
        from .gguf_run import GgufDecoder

        return GgufDecoder(path, threads), {"runtime": "llama.cpp",
                                            "runtime_version": dist_version("llama-cpp-python")}
    if path.suffix == ".pte":
        from .pte_run import PteDecoder

        return PteDecoder(path, threads), {"runtime": "executorch", "runtime_version": dist_version("executorch")}
    if path.suffix == ".so":
        from .tvm_run import TvmDecoder

        return TvmDecoder(path, threads), {"runtime": "tvm", "runtime_version": dist_version("apache-tvm")}
    from .onnx_run import OnnxDecoder, make_session

    session = make_session(path, threads, exact_qdq=exact_qdq, config=ort_config)
    import onnxruntime

    return OnnxDecoder(session), {"runtime": "onnxruntime", "runtime_version": onnxruntime.__version__}


def dist_version(dist: str, missing: str | None = "unknown") -> str | None:
    """The installed version of the distribution ``dist``, or ``missing``."""
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # a runtime imported from a plain folder has no metadata
        return missing


def cpu_name() -> str:
    """What this machine calls its CPU (x86 'model name'; ARM implementer/part, or the board model)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if "model name" in fields:
        return fields["model name"]
    if "Model" in fields:
        return fields["Model"]
    part = fields.get("CPU part")
    return f"ARM implementer {fields.get('CPU implementer', '?')} part {part}" if part else platform.machine()


def environment(runtime: dict[str, str]) -> dict[str, Any]:
    return {"machine": platform.machine(), "hostname": platform.node(), "python": platform.python_version(),
            "cpu": cpu_name(), "cores": os.cpu_count(), **runtime}


def score_window(logits: np.ndarray, ids: np.ndarray) -> dict[str, Any]:
    """Summed NLL of each next token and the argmax of every scored position, for one window."""
    x = logits[:-1].astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    targets = ids[1:]
    nll = float((lse - x[np.arange(len(targets)), targets]).sum())
    return {"nll": nll, "n": len(targets), "argmax": x.argmax(-1).astype(int).tolist()}


def run_job(job: dict[str, Any], base: Path) -> dict[str, Any]:
    """Execute ``job`` (paths relative to ``base``); every timing is taken here, on this machine."""
    t0 = time.perf_counter()
    decoder, runtime = open_runtime(base / job["model"], int(job.get("threads", 0)), bool(job.get("exact_qdq")),
                                    job.get("ort_config"))
    out: dict[str, Any] = {"schema": SCHEMA, "ok": True, "environment": environment(runtime),
                           "load_s": time.perf_counter() - t0}
    out["windows"] = [score_window(decoder.logits(np.asarray([w], np.int64))[0], np.asarray(w, np.int64))
                      for w in job.get("windows", [])]
    ttft, rates = [], []
    from .power import PowerMeter

    # A device's own runs read its power sensors (the job names its sysfs); an emulator's would read the host's.
    meter = PowerMeter(job["power_root"]) if job.get("power_root") else None
    if meter and meter.available:  # the generation runs below, timed: their average power
        meter.start()
    if job.get("greedy_prompt"):
        out["greedy"], timing = decoder.generate(list(job["greedy_prompt"]), int(job.get("greedy_tokens", 32)))
        if job.get("time_greedy") and timing.decode_s:  # no timed runs of their own: the greedy run's times
            ttft.append(timing.prefill_s * 1000.0)
            rates.append(len(timing.decode_s) / sum(timing.decode_s))
    prompt = job.get("timing_prompt")
    if prompt:
        decoder.generate(list(prompt[:8]), 4)  # warm-up: first-run allocations are not the steady state
        for _ in range(int(job.get("repeats", 3))):
            _, timing = decoder.generate(list(prompt), int(job.get("decode_tokens", 32)))
            ttft.append(timing.prefill_s * 1000.0)
            if timing.decode_s:
                rates.append(len(timing.decode_s) / sum(timing.decode_s))
    if meter and meter.available:
        out["power"] = meter.stop()
    out.update(ttft_ms=ttft, decode_tokens_per_s=rates, wall_s=time.perf_counter() - t0,
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    return out
