"""Validate an exported artifact against the PyTorch float32 reference, on the host.

Every figure carries where it was measured. Host figures come from ONNX Runtime on this machine,
whatever the target; the target's own speed appears only as the profile's roofline estimate.
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slm_export.errors import DeviceError
from slm_export.models.encoders import max_tokens
from slm_export.options import at_least, check_values, opt, positive, whole_at_least
from slm_export.runner.job import dist_version, open_runtime
from slm_export.runner.power import PowerMeter
from slm_export.text import TextSource, token_windows
from slm_export.validation.generate import forced_greedy, make_session, torch_greedy
from slm_export.validation.metrics import check_finite, cosine, decoder_accuracy

DEVICE = "device (hardware in the loop)"
EFFORT = "validation effort"


@dataclass(frozen=True)
class ValidationSettings:
    """How much to measure, and where. Defaults match docs/benchmarks/baselines.md (8 windows of 512 tokens).
    The fields with an ``Option`` are the CLI's validation flags (declared here once)."""

    windows: int = opt(8, "512-token windows of the evaluation text for perplexity and agreement", group=EFFORT,
                       flag="--eval-windows", parse=whole_at_least(1), check=at_least(1))
    window_len: int = 512
    greedy_tokens: int = 32
    prompt_tokens: int = 128
    decode_tokens: int = opt(64, "tokens decoded in each of the 5 timed runs after the 128-token prompt",
                             group=EFFORT, flag="--timing-tokens", parse=whole_at_least(2), check=at_least(2))
    repeats: int = 5
    threads: int = opt(0, "threads for the whole run: calibration, export and validation (0: all cores)", group=EFFORT,
                       parse=whole_at_least(0), check=at_least(0))
    emulate_tokens: int | None = opt(
        None, "tokens in each emulated run's accuracy window (default 256 for ONNX Runtime, 128 for TVM: each "
        "emulated token costs about a hundred host tokens)", group=EFFORT, parse=whole_at_least(16),
        check=at_least(16))
    sysfs: str = "/sys"  # where the host's power sensors are read (tests point it at a fake tree)
    exact_qdq: bool = False  # Q/DQ as float products of the int8 values (the artifact's runtime is not ORT)
    # A device to validate on too (ssh://user@host:port), how to reach it, and how long a run may take there.
    device: str | None = opt(None, "validate on a device too: "
                             "ssh://user@host[:port][?workdir=DIR&python=python3&sysfs=/sys]", group=DEVICE)
    identity: str | None = opt(None, "SSH private key (default: your ssh agent and ~/.ssh keys)", group=DEVICE,
                               short="-i")
    known_hosts: str | None = opt(None, "known_hosts file to check the device's key against (default ~/.ssh/)",
                                  group=DEVICE)
    device_timeout: float = opt(3600.0, "seconds a run may take on the device", group=DEVICE, parse=positive,
                                check=at_least(1e-9))
    goals_file: str | None = opt(None, "TOML goals replacing the defaults: [metric] with max, min or equals",
                                 group=DEVICE, flag="--goals")

    def __post_init__(self) -> None:
        check_values(ValidationSettings, {k: getattr(self, k) for k in self.__dataclass_fields__})


def where_host(model_path: Path | None = None) -> str:
    """The label of a host figure: machine, runtime, and the artifact file that ran."""
    import onnxruntime as ort

    ran = f", {model_path.name}" if model_path is not None else ""
    return f"measured on host ({platform.machine()}, onnxruntime {ort.__version__} CPU{ran})"


def metric(value: Any, unit: str, where: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "where": where}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def validate_decoder(model_path: Path, module: Any, tokenizer: Any, text: TextSource,
                     s: ValidationSettings, progress: Any = None) -> dict[str, Any]:
    """Accuracy, greedy continuation and latency of a decoder artifact.

    A streamed reference (``module.streamed``: a model too large to hold) never runs beside the runtime's session:
    its logits over the windows are computed first and kept on disk, and its greedy check runs after the session
    is closed, so the peak is the larger of the two, not their sum."""
    import torch

    torch.set_num_threads(s.threads or torch.get_num_threads())
    windows = token_windows(tokenizer, text, s.windows, s.window_len)
    streamed = getattr(module, "streamed", False)
    with tempfile.TemporaryDirectory(prefix="slm-reference-") as cache:
        reference = _reference(module, windows, Path(cache) if streamed else None)
        if streamed:  # the reference's freed blocks go back to the system before the session takes its share
            from slm_export.calibration.sequential import trim_heap

            gc.collect()
            trim_heap()
        dec, host, threads = open_decoder(Path(model_path), s)
        acc = decoder_accuracy(reference, dec, windows, Path(model_path).name, "host")  # NaN or Inf: NonFiniteOutput
    out: dict[str, Any] = {k: metric(v, "", host) for k, v in acc.items()}
    out["perplexity_change_pct"]["unit"] = "%"
    if progress:
        progress("accuracy")

    prompt = windows[0][: min(s.prompt_tokens, len(windows[0]) // 2)]
    got, _ = dec.generate(prompt, s.greedy_tokens)
    ref = None if streamed else torch_greedy(module, prompt, s.greedy_tokens)
    latency = _latency(dec, (windows[0] * 2)[: s.prompt_tokens], s, host)
    if streamed:  # the session's memory goes before the reference reads its blocks again
        del dec
        gc.collect()
        ref = forced_greedy(module, prompt, got)
    same = next((i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), min(len(ref), len(got)))
    out["greedy_match"] = metric(same == s.greedy_tokens and len(got) == s.greedy_tokens, "bool", host)
    out["greedy_matching_prefix"] = metric(same, "tokens", host)
    out["greedy_text"] = metric(tokenizer.decode(got), "text", host)
    if progress:
        progress("greedy")
    return {**out, **latency, "threads": metric(threads, "", host)}


def _reference(module: Any, windows: list[list[int]], cache: Path | None) -> Any:
    """The reference's logits for a window, ``ids [1, n] -> [1, n, vocab]``: computed when asked, or (``cache``)
    all computed now, each window's written to ``cache`` and read back when asked."""
    import torch

    def run(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(ids)).logits.float().numpy()

    if cache is None:
        return run
    files = {}
    for i, w in enumerate(windows):
        ids = np.asarray([w], dtype=np.int64)
        files[ids.tobytes()] = cache / f"{i}.npy"
        np.save(files[ids.tobytes()], run(ids))
    return lambda ids: np.load(files[ids.tobytes()])


def _latency(dec: Any, long_prompt: list[int], s: ValidationSettings, host: str) -> dict[str, Any]:
    """TTFT and decode speed of the artifact's runtime over ``s.repeats`` timed runs (power where sensors exist)."""
    out: dict[str, Any] = {}
    decode_tokens, repeats, how = s.decode_tokens, s.repeats, "greedy, KV cache"
    if dec.static_len is not None:  # every token recomputes the window: a short, honest sample
        decode_tokens, repeats = min(decode_tokens, 8), min(repeats, 2)
        how = f"greedy, static {dec.static_len}-token graph, no KV cache: each token recomputes the window"
    dec.generate(long_prompt, 2 if dec.static_len else 8)  # warm-up
    ttft, rates = [], []
    meter = PowerMeter(s.sysfs)
    if meter.available:
        meter.start()
    for _ in range(repeats):
        _, timing = dec.generate(long_prompt, decode_tokens)
        ttft.append(timing.prefill_s * 1000)
        rates.append(len(timing.decode_s) / sum(timing.decode_s))
    power = meter.stop() if meter.available else None
    if power:
        out["power_w"] = metric(power["watts"], "W", f"{host}: {power['source']}")
    out["ttft_ms_p50"] = metric(float(np.percentile(ttft, 50)), "ms", host + f", {len(long_prompt)}-token prompt")
    out["ttft_ms_p90"] = metric(float(np.percentile(ttft, 90)), "ms", host + f", {len(long_prompt)}-token prompt")
    out["decode_tokens_per_s_p50"] = metric(float(np.percentile(rates, 50)), "tokens/s",
                                            host + f", {how}, {decode_tokens} tokens")
    # p90 of throughput is the slow end: the 10th percentile of tokens/s.
    out["decode_tokens_per_s_p90"] = metric(float(np.percentile(rates, 10)), "tokens/s",
                                            host + ", slowest 10% of runs")
    return out


def open_decoder(path: Path, s: ValidationSettings) -> tuple[Any, str, Any]:
    """The runner for a decoder artifact file (the runner's ``open_runtime``), the label of its figures and
    its thread count: an ExecuTorch program through ExecuTorch's runtime, a TVM library through TVM's, a GGUF
    through llama.cpp, anything else through ONNX Runtime."""
    if path.suffix == ".pte":
        where = (f"measured on host ({platform.machine()}, executorch {dist_version('executorch', None)} runtime, "
                 f"XNNPACK, {path.name})")
        return _open_runtime(path, s), where, s.threads or "all"
    if path.suffix == ".so":
        where = (f"measured on host ({platform.machine()}, tvm {dist_version('apache-tvm', None)} runtime, untuned, "
                 f"{path.name})")
        return _open_runtime(path, s), where, s.threads or "all"
    if path.suffix == ".gguf":
        where = (f"measured on host ({platform.machine()}, llama.cpp (llama-cpp-python "
                 f"{dist_version('llama-cpp-python', None)}), {path.name})")
        return _open_runtime(path, s), where, s.threads or "all"
    host = where_host(path)
    if s.exact_qdq:
        host += ", Q/DQ pairs run as exact int8 products in float (emulated quantized arithmetic)"
    dec = _open_runtime(path, s)
    return dec, host, s.threads or dec.session.get_session_options().intra_op_num_threads or "all"


def _open_runtime(path: Path, s: ValidationSettings) -> Any:
    """``open_runtime``'s decoder; a missing ExecuTorch or TVM runtime is a DeviceError that says how to
    install it."""
    try:
        decoder, _ = open_runtime(path, s.threads, exact_qdq=s.exact_qdq)
    except ImportError:
        if path.suffix == ".pte":
            from slm_export.backends.executorch import INSTALL

            raise DeviceError(f"ExecuTorch's runtime is not installed; install: {INSTALL}") from None
        if path.suffix == ".so":
            from slm_export.backends.tvm import INSTALL

            raise DeviceError(f"TVM's runtime is not installed; install: {INSTALL}") from None
        if path.suffix == ".gguf":
            from slm_export.backends.llamacpp import INSTALL

            raise DeviceError(f"llama.cpp's Python bindings are not installed; install: {INSTALL}") from None
        raise
    return decoder


def encoder_feed(session: Any, enc: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The graph's inputs from the tokenizer's output. A tokenizer that returns no token_type_ids (any BPE
    tokenizer) leaves a graph that takes them the ids the model itself defaults to: zeros."""
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    return {i.name: np.asarray(enc[i.name], dtype=np.int64) if i.name in enc else np.zeros_like(ids)
            for i in session.get_inputs()}


def validate_encoder(model_path: Path, module: Any, tokenizer: Any, text: TextSource,
                     s: ValidationSettings, progress: Any = None) -> dict[str, Any]:
    """Cosine similarity of sentence embeddings, and latency, of an encoder artifact."""
    import torch

    host = where_host(Path(model_path))
    session = make_session(model_path, s.threads)
    lines = [ln.strip() for ln in text.text.splitlines() if len(ln.strip()) > 20][:64]
    # Sentences cut at 128 tokens, or at what the model's position table serves when that is shorter.
    enc = tokenizer(lines, padding=True, truncation=True, max_length=min(128, max_tokens(module.config)),
                    return_tensors="np")
    feed = encoder_feed(session, enc)
    got = session.run(["sentence_embedding"], feed)[0]
    with torch.no_grad():
        hidden = module(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
    m = feed["attention_mask"][..., None].astype(np.float32)
    ref = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    run, axes = f"host run of {Path(model_path).name}", ("sentence", "dimension")
    check_finite(ref, "the PyTorch float32 reference's sentence embeddings", run, axes)
    check_finite(got, "the artifact's sentence embeddings", run, axes)  # its own error, not a low cosine
    cos = cosine(ref, got)
    if progress:
        progress("accuracy")
    one = {k: v[:1] for k, v in feed.items()}
    session.run(None, one)
    times = []
    for _ in range(max(s.repeats, 5)):
        t = time.perf_counter()
        session.run(None, one)
        times.append((time.perf_counter() - t) * 1000)
    return {
        "embedding_cosine_min": metric(float(cos.min()), "", host + f", {len(lines)} sentences"),
        "embedding_cosine_mean": metric(float(cos.mean()), "", host),
        "latency_ms_p50": metric(float(np.percentile(times, 50)), "ms",
                                 host + f", 1 x {one['input_ids'].shape[1]} tokens"),
        "latency_ms_p90": metric(float(np.percentile(times, 90)), "ms", host),
        "threads": metric(s.threads or os.cpu_count() or 1, "", host),
    }
