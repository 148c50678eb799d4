"""Validation where the artifact really runs: an emulator now, a device over SSH later.

The host builds a job (token windows of the evaluation text, a greedy prompt, a timing prompt), a
runner executes it with the target's own runtime (``slm_export/runner``), and the host turns what
comes back into metrics: perplexity against the PyTorch float32 reference on the same windows, top-1
agreement with the reference and with the host's run of the same artifact file, the greedy
continuation compared with the host's, and the far side's time to first token and decode rate, each
labelled with where it was measured. The far side sees token ids only: no tokenizer, no tool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from slm_export.errors import NonFiniteOutput
from slm_export.runner.job import SCHEMA, open_runtime, score_window
from slm_export.text import TextSource, token_windows
from slm_export.validation.metrics import check_finite

RUN_LABELS = {"host": "crosscheck", "emulator": "emulated", "device": "device"}  # runner name: its run's name


class Runner(Protocol):
    """Runs a job on an artifact folder somewhere and returns the runner's result (``runner/job.py``)."""

    name: str

    def where(self, result: dict[str, Any], file: str) -> str: ...

    def run(self, artifact: Path, job: dict[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class RemoteSettings:
    """How much to run on the far side. Smaller than the host's defaults: an emulated aarch64 core runs
    ONNX Runtime's kernels about a hundred times slower than the host (docs/research/tvm_qemu.md)."""

    windows: int = 2
    window_len: int = 256
    greedy_tokens: int = 16
    prompt_tokens: int = 64
    decode_tokens: int = 16
    repeats: int = 2  # 0: no timed runs of their own; the greedy run's prefill and steps are timed instead
    threads: int = 0


def _metric(value: Any, unit: str, where: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "where": where}


class HostRunner:
    """Runs a job here, in this process, with this machine's runtime: the cross-check of a second backend's
    file (a TVM library beside the ONNX Runtime model) against the validated one."""

    name = "host"

    def where(self, result: dict[str, Any], file: str) -> str:
        e = result.get("environment", {})
        return f"measured on host ({e.get('machine')}, {e.get('runtime')} {e.get('runtime_version')}, {file})"

    def run(self, artifact: Path, job: dict[str, Any]) -> dict[str, Any]:
        from slm_export.runner.job import run_job

        return run_job(job, artifact)


def remote_validation(runner: Runner, artifact: Path, file: str, module: Any, tokenizer: Any, text: TextSource,
                      s: RemoteSettings, prefix: str, exact_qdq: bool = False, versus: str | None = None,
                      versus_label: str = "host") -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``artifact/file`` through ``runner``; returns (metrics named ``{prefix}_...``, run details).

    ``versus``: the file whose host run the far side is compared with, by default ``file`` itself (an
    emulated or device run of the file the host runs); ``versus_label`` names it in the metrics
    (``{prefix}_agreement_with_{versus_label}``, ``{prefix}_perplexity_change_vs_{versus_label}_pp``).
    """
    windows = token_windows(tokenizer, text, s.windows, s.window_len)
    prompt = windows[0][: min(s.prompt_tokens, len(windows[0]) // 2)]
    t0 = time.perf_counter()
    res = runner.run(artifact, _job(file, windows, prompt, s, exact_qdq))
    wall = time.perf_counter() - t0
    where = runner.where(res, file)
    run = RUN_LABELS.get(runner.name, runner.name)
    _check_far(res["windows"], run, file)
    versus = versus or file
    host_dec, _ = open_runtime(artifact / versus, s.threads, exact_qdq)
    ref_scores, host_scores = _host_scores(module, host_dec, windows, f"{run} run of {file}", versus)
    out = _accuracy(res, ref_scores, host_scores, module, host_dec, prompt, s, where, artifact, versus,
                    versus_label, len(windows))
    out.update(_timing(res, s, where, prompt))
    power = res.get("power")
    if power and power.get("watts"):
        out["power_w"] = _metric(float(power["watts"]), "W", f"{where}: {power['source']}")
    details = {"runner": runner.name, "status": "done", "file": file, "versus": versus, "where": where,
               "environment": res.get("environment", {}), "wall_s": round(wall, 1),
               "load_s": round(res.get("load_s", 0.0), 1), "far_peak_rss_mb": round(res.get("peak_rss_mb", 0.0), 1),
               "far_wall_s": round(res.get("wall_s", 0.0), 1),
               "windows": [len(windows), s.window_len]}
    return {f"{prefix}_{k}": v for k, v in out.items()}, details


def _job(file: str, windows: list[list[int]], prompt: list[int], s: RemoteSettings, exact_qdq: bool) -> dict[str, Any]:
    job = {"schema": SCHEMA, "model": file, "threads": s.threads, "exact_qdq": exact_qdq, "windows": windows,
           "greedy_prompt": prompt, "greedy_tokens": s.greedy_tokens}
    if s.repeats:
        job.update(timing_prompt=(windows[0] * 2)[: s.prompt_tokens], decode_tokens=s.decode_tokens,
                   repeats=s.repeats)
    else:
        job["time_greedy"] = True
    return job


def _check_far(far: list[dict[str, Any]], run: str, file: str) -> None:
    """The far side returns each window's summed NLL, not its logits: a NaN or +Inf logit makes that sum
    non-finite (log-sum-exp), so the window is known but not the position."""
    for i, x in enumerate(far):
        if not np.isfinite(x["nll"]):
            raise NonFiniteOutput(f"{run} run of {file}: window {i}'s negative log-likelihood is {x['nll']}, so its "
                                  "logits hold NaN or Inf (the runner returns sums per window, not the position); no "
                                  "accuracy figure can be measured on them, so the artifact fails")


def _host_scores(module: Any, host_dec: Any, windows: list[list[int]], run: str,
                 versus: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The same windows on the host: the float32 reference and the same artifact file under the host runtime."""
    import torch

    ref_scores, host_scores = [], []
    with torch.no_grad():
        for i, w in enumerate(windows):
            ids = np.asarray(w, np.int64)
            ref, host = module(torch.from_numpy(ids[None])).logits.float().numpy()[0], host_dec.logits(ids[None])[0]
            check_finite(ref, "the PyTorch float32 reference's logits", run, window=i)
            check_finite(host, "the host's logits", f"{run}, compared with the host run of {versus}", window=i)
            ref_scores.append(score_window(ref, ids))
            host_scores.append(score_window(host, ids))
    return ref_scores, host_scores


def _accuracy(res: dict[str, Any], ref_scores: list[dict[str, Any]], host_scores: list[dict[str, Any]], module: Any,
              host_dec: Any, prompt: list[int], s: RemoteSettings, where: str, artifact: Path, versus: str, v: str,
              n_windows: int) -> dict[str, Any]:
    from slm_export.validation.generate import torch_greedy
    from slm_export.validation.validate import where_host

    far = res["windows"]
    n = sum(x["n"] for x in far)

    def ppl(scores: list[dict[str, Any]]) -> float:
        return float(np.exp(sum(x["nll"] for x in scores) / n))

    def agree(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
        same = (int((np.asarray(x["argmax"]) == np.asarray(y["argmax"])).sum()) for x, y in zip(a, b, strict=True))
        return sum(same) / n

    p_ref, p_far, p_host = ppl(ref_scores), ppl(far), ppl(host_scores)
    host_greedy, _ = host_dec.generate(prompt, s.greedy_tokens)
    ref_greedy = torch_greedy(module, prompt, s.greedy_tokens)
    scope = f", {n_windows} x {s.window_len} tokens"
    host_where = where_host(artifact / versus) if versus.endswith((".onnx", ".ort")) else f"measured on host ({versus})"
    against_ref = ", against PyTorch float32"
    out = {
        "perplexity": _metric(p_far, "", where + scope),
        "perplexity_change_pct": _metric(100 * (p_far / p_ref - 1), "%", where + scope + against_ref),
        f"{v}_perplexity_change_pct": _metric(100 * (p_host / p_ref - 1), "%", host_where + scope + ", same windows"),
        "top1_agreement": _metric(agree(far, ref_scores), "", where + scope + against_ref),
        f"agreement_with_{v}": _metric(agree(far, host_scores), "",
                                       f"{where}{scope}, against the host run of {versus}"),
        f"greedy_equals_{v}": _metric(res.get("greedy") == host_greedy, "bool", f"{where}, {s.greedy_tokens} tokens"),
        "greedy_equals_reference": _metric(res.get("greedy") == ref_greedy, "bool",
                                           f"{where}, {s.greedy_tokens} tokens{against_ref}"),
    }
    out[f"perplexity_change_vs_{v}_pp"] = _metric(
        out["perplexity_change_pct"]["value"] - out[f"{v}_perplexity_change_pct"]["value"], "pp", where + scope)
    return out


def _timing(res: dict[str, Any], s: RemoteSettings, where: str, prompt: list[int]) -> dict[str, Any]:
    timed = (f", {s.prompt_tokens}-token prompt", f", {s.decode_tokens} tokens") if s.repeats else \
        (f", the greedy run's {len(prompt)}-token prompt", f", the greedy run's {s.greedy_tokens} tokens")
    out = {}
    if res.get("ttft_ms"):
        out["ttft_ms_p50"] = _metric(float(np.median(res["ttft_ms"])), "ms", where + timed[0])
    if res.get("decode_tokens_per_s"):
        out["decode_tokens_per_s_p50"] = _metric(float(np.median(res["decode_tokens_per_s"])), "tokens/s",
                                                 where + timed[1])
    return out


