#!/usr/bin/env python
"""Issue-30 figures: this tool's artifacts run by the runtimes apps embed, against those runtimes' own artifacts.

One run, ``smollm2-135m``, the same threads for everyone, every system timed in the same interleaved rounds
(``slm_export.bench``: one warm-up each, then ``--repeats`` rounds in a rotated order; a figure is a median
over the rounds, a comparison the median of the per-round ratios with the middle half of them beside it):

(a) ONNX Runtime GenAI's own generator on this tool's host int4 default artifact (the folder as it comes out:
    ``genai_config.json`` beside the ORT file) and on GenAI's own int4 artifact of the same float model (its
    model builder, ``-p int4 -e cpu``, accuracy level 4; ``decode_peers.genai_export``), the same loop on both
    files (``decode_peers.genai_runner``). Checks: GenAI's greedy tokens on our folder equal the project
    runner's; decode tok/s >= 1.0x GenAI's artifact; our perplexity change at most a quarter of GenAI's.
(b) ExecuTorch's own LLM runner (``TextLLMRunner``, what its Android ``LlmModule`` is built on) on the
    android fp32 ``.pte`` with the ``tokenizer.json`` beside it. Checks: its greedy pieces equal PyTorch's
    float32 greedy; its decode tok/s within 10% of the project runner (``runner/pte_run.py``) on the same
    ``.pte``. The runner's own stats time it (first token to the end of generation).
(c) llama.cpp (llama-cpp-python, one build, one process) on the llamacpp backend's Q4_0 GGUF (AWQ+GPTQ,
    symmetric int4, group 32, the int8 head as Q8_0) and on llama.cpp's own Q4_0 and Q4_K_M of the same float
    model (the backend's F32 GGUF through ``llama_model_quantize``), all through the runner's GGUF decoder
    (``runner/gguf_run.py``). Checks: our perplexity change at least 3x smaller than its Q4_0's; decode
    speed within 3% of its Q4_0 (the same format, so the same kernel).

Every perplexity change is measured on the same windows of the built-in evaluation text against PyTorch
float32 through this tool's validator (``decoder_accuracy``), as in ``bench_decode.py``.

Usage: python scripts/bench_runtimes.py [--threads 2] [--work DIR] [--repeats 5] [--parts a,b,c]
  --work DIR keeps the artifacts there and reuses them on the next run (the int4 calibrations take minutes).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from bench_decode import cpu_line, decode_args, ours, prompt_and_windows
from decode_peers import GenAIScorer, genai_export, genai_runner

from slm_export.bench import Runner, export_report, in_fresh_process, interleaved_rounds, paired_ratio, print_table

MODEL = "smollm2-135m"
IDLE_S = 0.5  # pause before each timed run: the previous system's worker threads spin a while (bench_decode)
GGUF_PROFILE = "host-llamacpp.toml"  # the host profile with llamacpp as its only backend, written into --work
# Each build: (built-in target or None for GGUF_PROFILE, slm_export.export's keywords).
BUILDS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "host-int4": ("host", {"precision": "int4"}),  # the host's int4 default, as the CLI makes it
    "android-fp32": ("android", {"precision": "fp32"}),
    # our Q4_0: AWQ+GPTQ codes, symmetric (signed scales, llama.cpp's grid), the head int8 (Q8_0) as llama.cpp's
    # own quantizer makes a tied head whose width is not a multiple of 256 (its Q6_K falls back to Q8_0)
    "gguf-int4": (None, {"precision": "int4", "method": "awq-gptq", "symmetric": True, "group_size": 32,
                         "lm_head_bits": 8}),
    "gguf-f32": (None, {"precision": "fp32"}),
}
LLAMA_TYPES = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
               "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- building ----------------------------------------------------------------------------------------
def gguf_profile(work: Path) -> Path:
    """The host profile with ``llamacpp`` as its only backend: how a user asks for a GGUF alone."""
    text = (resources.files("slm_export.targets") / "profiles" / "host.toml").read_text()
    text = text.replace('id = "host"', 'id = "host-llamacpp"').replace('order = ["onnxruntime"]',
                                                                     'order = ["llamacpp"]')
    text = "\n".join("aliases = []" if line.startswith("aliases =") else line for line in text.splitlines())
    path = work / GGUF_PROFILE
    path.write_text(text + "\n")
    return path


def build(work: Path, name: str, threads: int) -> Path:
    """The artifact ``name`` of BUILDS, built through ``slm_export.export`` in a fresh process without validation
    (this script scores every system itself); one already in ``work`` is reused."""
    import shutil

    from slm_export.validation.validate import ValidationSettings

    out = work / name
    if (out / "report.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    target, options = BUILDS[name]
    if target is None:
        options = {**options, "target_file": str(gguf_profile(work))}
    t = time.perf_counter()
    try:
        in_fresh_process(export_report, MODEL, target or "host", out, validate=False,
                         settings=ValidationSettings(threads=threads), **options)
    except Exception as exc:
        raise SystemExit(f"export {name} failed: {type(exc).__name__}: {exc}") from None
    log(f"  built {name} in {time.perf_counter() - t:.0f} s")
    return out


def llama_quantize(src: Path, out: Path, kind: str, threads: int) -> Path:
    """llama.cpp's own quantization (``llama_model_quantize``, what its ``llama-quantize`` tool calls) of ``src``."""
    import llama_cpp

    if out.is_file():
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = getattr(llama_cpp, LLAMA_TYPES[kind]), threads
    tmp = out.with_suffix(".partial")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)):
        raise SystemExit(f"llama_model_quantize {kind} of {src} failed")
    tmp.rename(out)
    return out


# ---- (a) ONNX Runtime GenAI ------------------------------------------------------------------------------
def genai_greedy(folder: Path, prompt: list[int], new: int, threads: int) -> list[int]:
    """GenAI's generator on ``folder`` as an app drives it: greedy, ``new`` tokens after ``prompt``."""
    import json

    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new, min_length=len(prompt) + new)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


# ---- (b) ExecuTorch's LLM runner ---------------------------------------------------------------------------
def et_bindings() -> Any:
    # The program calls llama::update_cache / custom_sdpa: importing the custom ops registers their kernels.
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    from executorch.extension.llm import runner

    return runner


class StdoutToStderr:
    """File descriptor 1 pointed at stderr for a while: ExecuTorch's runner prints the text it generates and its
    stats to stdout from C++, where the bench's table goes."""

    def __enter__(self) -> None:
        sys.stdout.flush()
        self.saved = os.dup(1)
        os.dup2(2, 1)

    def __exit__(self, *exc: object) -> None:
        os.dup2(self.saved, 1)
        os.close(self.saved)


def et_runner(folder: Path, text: str, new: int) -> tuple[Runner, Any]:
    """ExecuTorch's TextLLMRunner on the folder's ``model.pte`` and ``tokenizer.json``, greedy; the Runner times
    it by the runner's own stats, and ``generate()`` returns (pieces, stats)."""
    bindings = et_bindings()
    with StdoutToStderr():
        runner = bindings.TextLLMRunner(str(folder / "model.pte"), str(folder / "tokenizer.json"))

    def generate() -> tuple[list[str], Any]:
        pieces: list[str] = []
        stats: list[Any] = []
        runner.reset()
        config = bindings.GenerationConfig(max_new_tokens=new, temperature=0.0, echo=False)
        with StdoutToStderr():
            runner.generate(text, config, pieces.append, stats.append)
        return pieces, stats[-1]

    def run() -> tuple[float, list[float]]:
        _, s = generate()
        n = s.num_generated_tokens - 1
        return (s.first_token_ms - s.inference_start_ms) / 1e3, [(s.inference_end_ms - s.first_token_ms) / 1e3 / n] * n

    return run, generate


def pte_runner(path: Path, prompt: list[int], new: int, threads: int) -> Runner:
    from slm_export.runner.pte_run import PteDecoder

    dec = PteDecoder(path, threads)

    def run() -> tuple[float, list[float]]:
        _, timing = dec.generate(prompt, new)
        return timing.prefill_s, timing.decode_s

    return run


# ---- (c) llama.cpp --------------------------------------------------------------------------------------
def gguf_runner(path: Path, prompt: list[int], new: int, threads: int) -> tuple[Runner, Any]:
    from slm_export.runner.gguf_run import GgufDecoder

    dec = GgufDecoder(path, threads)

    def run() -> tuple[float, list[float]]:
        _, timing = dec.generate(prompt, new)
        return timing.prefill_s, timing.decode_s

    return run, dec


# ---- the parts -------------------------------------------------------------------------------------------
class Bench:
    """What the parts share: the settings, the evaluation windows, the float reference, and what each part adds:
    systems to time, table rows, and checks judged once the rounds are done."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from slm_export.models import load_model

        self.args, self.work, self.threads, self.new = args, args.work, args.threads, args.new
        self.model = load_model(MODEL)
        self.module = self.model.torch_module()
        self.prompt, self.windows = prompt_and_windows(self.model.tokenizer, args.prompt, args.windows)
        self.torch = torch
        self.runs: dict[str, Runner] = {}
        self.rows: dict[str, dict[str, Any]] = {}  # system -> part, ppl, kl, greedy
        self.checks: list[tuple[str, Any]] = []  # (label, rates -> (figure, passed))

    def reference(self, ids: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self.module(self.torch.from_numpy(ids)).logits.numpy()

    def accuracy(self, decoder: Any) -> dict[str, float]:
        from slm_export.validation.metrics import decoder_accuracy

        return decoder_accuracy(self.reference, decoder, self.windows)

    def add(self, part: str, name: str, run: Runner, acc: dict[str, float] | None = None, greedy: str = "") -> None:
        self.runs[name] = run
        self.rows[name] = {"part": part, "ppl": acc and acc["perplexity_change_pct"], "kl": acc and acc["mean_kl"],
                           "greedy": greedy}

    def ppl(self, name: str) -> float:
        return float(self.rows[name]["ppl"])


def part_genai(b: Bench) -> None:
    import json

    folder = build(b.work, "host-int4", b.threads)
    genai_dir = genai_export(b.work, b.model, b.threads)
    if genai_dir is None:
        raise SystemExit("(a) needs onnxruntime_genai (pip install onnxruntime-genai --no-deps)")
    report = json.loads((folder / "report.json").read_text())
    _, dec, path = ours(folder, report, b.prompt, b.new, b.threads)
    log("(a) greedy and perplexity ...")
    runner_tokens = dec.generate(b.prompt, b.args.greedy)[0]
    genai_tokens = genai_greedy(folder, b.prompt, b.args.greedy, b.threads)
    same = genai_tokens == runner_tokens
    first = next((i for i, (x, y) in enumerate(zip(genai_tokens, runner_tokens, strict=True)) if x != y), None)
    ours_name, theirs = f"GenAI generator, our host int4 default ({path.name})", "GenAI generator, GenAI's int4"
    b.add("a", ours_name, genai_runner(folder, b.prompt, b.new, b.threads), b.accuracy(dec),
          f"= our runner's, {len(runner_tokens)} tokens" if same else f"differs at token {first}")
    b.add("a", theirs, genai_runner(genai_dir, b.prompt, b.new, b.threads),
          b.accuracy(GenAIScorer(genai_dir / "model.onnx", b.threads)))
    b.checks.append(("(a) GenAI's greedy tokens on our folder = our runner's", lambda r: ("", same)))
    b.checks.append(("(a) decode: GenAI generator on ours >= 1.0x on GenAI's int4",
                     lambda r: _ratio(r, ours_name, theirs, 1.0)))
    b.checks.append(("(a) perplexity change: ours <= 1/4 of GenAI's int4", lambda r: (
        f"{b.ppl(ours_name):+.2f}% vs {b.ppl(theirs):+.2f}%", b.ppl(ours_name) <= 0.25 * b.ppl(theirs))))


def _ratio(rates: dict[str, Any], a: str, base: str, at_least: float) -> tuple[str, bool]:
    r = paired_ratio(rates[a], rates[base])
    return f"{r.median:.3f}x (middle half {r.spread})", r.median >= at_least


def torch_greedy_pieces(b: Bench, ids: list[int], new: int) -> list[str]:
    """PyTorch float32's greedy continuation, as the pieces the ExecuTorch runner hands out, up to the end token."""
    tok = b.model.tokenizer
    with b.torch.no_grad():
        out = b.module.generate(b.torch.tensor([ids]), max_new_tokens=new, do_sample=False,
                                pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    if tok.eos_token_id in out:
        out = out[:out.index(tok.eos_token_id)]
    return [tok.backend_tokenizer.decode([t], skip_special_tokens=False) for t in out]


def part_executorch(b: Bench) -> None:
    folder = build(b.work, "android-fp32", b.threads)
    text = b.model.tokenizer.decode(b.prompt)
    ids = b.model.tokenizer(text, add_special_tokens=False).input_ids
    ours_name, theirs = "our runner (pte_run), android fp32 .pte", "ExecuTorch TextLLMRunner, android fp32 .pte"
    b.add("b", ours_name, pte_runner(folder / "model.pte", ids, b.new, b.threads))
    run, generate = et_runner(folder, text, b.new)
    log("(b) greedy ...")
    try:
        pieces, stats = generate()
        want = torch_greedy_pieces(b, ids, b.args.greedy)
        same = stats.num_prompt_tokens == len(ids) and pieces[:len(want)] == want
        greedy = (f"= PyTorch fp32, {len(want)} tokens" if same else
                  f"differs (prompt {stats.num_prompt_tokens} vs {len(ids)} tokens)")
    except Exception as exc:  # noqa: BLE001 - the bindings raise on a piece that is not valid UTF-8
        same, greedy = False, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    b.add("b", theirs, run, greedy=greedy)
    b.checks.append(("(b) ExecuTorch runner's greedy on the fp32 .pte = PyTorch fp32", lambda r: ("", same)))
    b.checks.append(("(b) decode: ExecuTorch runner within 10% of our runner on the same .pte",
                     lambda r: _within(r, theirs, ours_name, 0.10)))


def _within(rates: dict[str, Any], a: str, base: str, tol: float) -> tuple[str, bool]:
    r = paired_ratio(rates[a], rates[base])
    return f"{r.median:.3f}x (middle half {r.spread})", abs(r.median - 1.0) <= tol


def part_llamacpp(b: Bench) -> None:
    ours_path = build(b.work, "gguf-int4", b.threads) / "model.gguf"
    f32 = build(b.work, "gguf-f32", b.threads) / "model.gguf"
    files = {"llama.cpp, our Q4_0 (AWQ+GPTQ, Q8_0 head)": ours_path}
    for kind in ("Q4_0", "Q4_K_M"):
        files[f"llama.cpp, its own {kind} of the F32 GGUF"] = llama_quantize(f32, b.work / f"llama-{kind}.gguf", kind,
                                                                             b.threads)
    for name, path in files.items():
        log(f"(c) perplexity: {name} ...")
        run, dec = gguf_runner(path, b.prompt, b.new, b.threads)
        b.add("c", name, run, b.accuracy(dec))
    ours_name, q4_0 = list(files)[:2]
    b.checks.append(("(c) perplexity change: ours at least 3x smaller than llama.cpp's Q4_0", lambda r: (
        f"{b.ppl(ours_name):+.2f}% vs {b.ppl(q4_0):+.2f}%", 3 * b.ppl(ours_name) <= b.ppl(q4_0))))
    b.checks.append(("(c) decode: ours within 3% of llama.cpp's Q4_0", lambda r: _within(r, ours_name, q4_0, 0.03)))


PARTS = {"a": part_genai, "b": part_executorch, "c": part_llamacpp}


def report(b: Bench, rates: dict[str, Any]) -> bool:
    import onnxruntime

    from slm_export.runner.job import dist_version

    versions = {d: dist_version(d, "not installed") for d in ("onnxruntime-genai", "executorch", "llama-cpp-python")}
    print(f"## {MODEL}: app runtimes on this tool's artifacts, {b.threads} threads, prompt {len(b.prompt)} tokens, "
          f"{b.new} new tokens, median of {b.args.repeats} interleaved rounds after a warm-up")
    print(cpu_line())
    print(f"onnxruntime {onnxruntime.__version__}, " + ", ".join(f"{k} {v}" for k, v in versions.items())
          + f"; perplexity change and mean KL per token on {len(b.windows)} x 512 evaluation tokens against PyTorch "
          f"float32; greedy over {b.args.greedy} tokens; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    cells = [[r["part"], name, f"{rates[name].tok_s:.1f}", f"{rates[name].ttft_s * 1e3:.0f}",
              "-" if r["ppl"] is None else f"{r['ppl']:+.2f}%", "-" if r["kl"] is None else f"{r['kl']:.4f}",
              r["greedy"] or "-"] for name, r in b.rows.items()]
    print_table(["part", "system", "decode tok/s", "TTFT ms", "ppl change", "mean KL", "greedy"], cells)
    print()
    ok = True
    for label, judge in b.checks:
        figure, passed = judge(rates)
        ok &= bool(passed)
        print(f"{'PASS' if passed else 'FAIL'}  {label}{': ' + figure if figure else ''}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    decode_args(ap, windows=8)
    ap.add_argument("--greedy", type=int, default=32, help="tokens of the greedy comparisons")
    ap.add_argument("--parts", default="a,b,c", help="comma-separated subset of a (GenAI), b (ExecuTorch), c "
                    "(llama.cpp)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    parts = [p.strip() for p in args.parts.split(",")]
    if not parts or set(parts) - set(PARTS):
        raise SystemExit(f"--parts: choose from {', '.join(PARTS)}")
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory()
        args.work = Path(tmp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(args.threads)
    b = Bench(args)
    for p in parts:
        PARTS[p](b)
    log(f"timing {len(b.runs)} systems, {args.repeats} interleaved rounds ...")
    ok = report(b, interleaved_rounds(b.runs, args.repeats, idle_s=IDLE_S))
    if tmp is not None:
        tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
