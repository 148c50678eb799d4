#!/usr/bin/env python
"""Issue-6 figures: decode speed of this tool's CPU artifacts against PyTorch eager and the fastest peers.

One run, ``smollm2-135m``, the same threads for everyone: greedy decoding of ``--new`` tokens after a
``--prompt``-token prompt (the start of the built-in evaluation text), one warm-up each, then
``--repeats`` rounds; each round runs every system once, in a rotated order, so that a machine whose speed
drifts over minutes (a shared box) slows every row alike. Each row's figure is its median over the rounds;
the ratio checks against GenAI and between thread counts use the median of the per-round ratios (the rounds,
medians and ratios are ``slm_export.bench``'s, which every bench script shares). Rows:

- PyTorch eager float32 (transformers ``generate``): the reference, ratio 1.0;
- this tool's float32, int8 and int4 artifacts (``slm_export.export`` for the host target, a fresh process
  each: the CLI's plan and defaults, each profile default method; int8 quantizes the LM head to int8, int4 to
  int4 with its 15% hot rows int8 too), the int4 artifact with an int8, an int4 and a float head, and
  symmetric int4 (``--symmetric``, the form GenAI's builder writes) with the default and an int4 head, run by
  the project's own generation loop;
- ONNX Runtime GenAI's model builder (``-p int4 -e cpu``, accuracy level 4) through its own generator,
  when ``onnxruntime_genai`` imports (``pip install onnxruntime-genai --no-deps``), on the bench's threads
  and on 1 thread (its own 2-thread scaling, printed beside the int4 artifact's);
- llama.cpp through ``llama_cpp`` when it imports (not installed by the project: it compiles for minutes).
  Both peers live in ``decode_peers.py``.

Beside the table, the int4 MatMulNBits kernel is timed alone for one token with and without zero points, on
the int4 artifact's shapes: the cost of the default's asymmetric int4 on this CPU (1.12-1.23x on an AVX2 box,
2026-12-04), which the symmetric rows show end to end.

Every row's perplexity change is measured here, through this tool's validator, on the same windows of
the evaluation text against PyTorch float32. A STREAM-like read (a multi-threaded sum of a buffer several
times the last-level cache) gives the machine's bandwidth now; each artifact's roofline is that
bandwidth over the bytes of weights one decoded token reads, as its report records them
(``roofline.weight_bytes_read_per_token``: every linear weight, the LM head included; of an embedding table
only one row); GenAI's are counted from its graph's matmul initializers (``decode_peers.bytes_read_per_token``).

Usage: python scripts/bench_decode.py [--threads 2] [--work DIR] [--rows fp32,int8,int4,...] [--quick]
  --work DIR keeps the exported artifacts there and reuses them on the next run (export takes minutes).
  --quick: the int4 rows by round-to-nearest (no calibration): the speed figures hold, their perplexity is
  RTN's, not the default method's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from decode_peers import GenAIScorer, bytes_read_per_token, genai_export, genai_runner, llama_cpp_runner

from slm_export.bench import (
    Rates,
    Runner,
    export_report,
    in_fresh_process,
    interleaved_rounds,
    paired_ratio,
    paired_ratios,
    print_table,
)

CPUINFO = Path("/proc/cpuinfo")


def stream_read_gbs(threads: int) -> float:
    """The machine's read bandwidth now (1e9 B/s): the same measurement the host profile caches."""
    from slm_export.targets.host import measure_bandwidth_gbs

    return measure_bandwidth_gbs(threads)


def cpu_line() -> str:
    """The box, as a table needs to name it: the model name alone ("AMD EPYC") does not tell a Zen 3 from a
    Zen 5, and the int4 kernels' speed (zero points above all) changes with the family and the flags."""
    from slm_export.targets import get_target

    cpu = get_target("host").cpu  # model and ML-relevant flags as the host profile detects them
    name, flags = (None if cpu.model == "unknown" else cpu.model), cpu.features
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:  # containers, macOS
        text = ""
    ids = {}
    for line in text.splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        if key in ("cpu family", "model", "CPU implementer", "CPU part") and key not in ids:
            ids[key] = value
    where = ", ".join(f"{k} {v}" for k, v in ids.items())
    return f"CPU: {name or 'unknown'}{f' ({where})' if where else ''}, {os.cpu_count()} logical CPUs; " \
           f"kernel-relevant flags: {' '.join(flags) or 'none found'}"


def zero_point_cost(onnx_path: Path, threads: int, chain: int = 30, repeats: int = 7) -> dict[tuple[int, int], float]:
    """Time ONNX Runtime's int4 MatMulNBits for one token (M=1) with zero points over the same kernel without
    them, for each (N, K) of the artifact's 4-bit matmuls: ``chain`` weights of that shape (random codes),
    read once per pass as a decode step reads them, best of ``repeats`` passes. Returns asym / sym time."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    shapes = sorted({(a["N"], a["K"], a["block_size"]) for a in (
        {x.name: helper.get_attribute_value(x) for x in n.attribute} for n in model.graph.node
        if n.op_type == "MatMulNBits") if a.get("bits") == 4})
    rng = np.random.default_rng(0)
    out: dict[tuple[int, int], float] = {}
    for n, k, block in shapes:
        best = {}
        for zp in (False, True):
            nodes, inits = [], []
            for i in range(chain):
                codes = rng.integers(0, 256, (n, k // block, block // 2), dtype=np.uint8)
                inits += [numpy_helper.from_array(codes, f"w{i}"),
                          numpy_helper.from_array(rng.random(n * k // block).astype(np.float32) * 0.01, f"s{i}")]
                ins = ["x", f"w{i}", f"s{i}"]
                if zp:
                    inits.append(numpy_helper.from_array(
                        rng.integers(0, 256, n * ((k // block + 1) // 2), dtype=np.uint8), f"z{i}"))
                    ins.append(f"z{i}")
                nodes.append(helper.make_node("MatMulNBits", ins, [f"y{i}"], domain="com.microsoft", K=k, N=n, bits=4,
                                              block_size=block, accuracy_level=4))
            graph = helper.make_graph(nodes, "chain",
                                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
                                      [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, 1, n])
                                       for i in range(chain)], inits)
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.log_severity_level = threads, 3
            sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[
                helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]).SerializeToString(), so,
                providers=["CPUExecutionProvider"])
            feed = {"x": rng.random((1, 1, k)).astype(np.float32)}
            for _ in range(10):
                sess.run(None, feed)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                for _ in range(10):
                    sess.run(None, feed)
                times.append(time.perf_counter() - t)
            best[zp] = min(times)
        out[(n, k)] = best[True] / best[False]
    return out


def prompt_and_windows(tokenizer: Any, n_prompt: int, n_windows: int) -> tuple[list[int], list[list[int]]]:
    from slm_export.text import builtin_split, token_windows

    text = builtin_split("evaluation")
    windows = token_windows(tokenizer, text, n_windows, 512)
    return tokenizer(text.text[:20000], add_special_tokens=False).input_ids[:n_prompt], windows


# The int4 perplexity change the compression issue reached (bench_compress, AWQ+GPTQ g32, float head):
# issue 6 asks the fast int4 artifact to stay within it.
COMPRESSION_PPL = 4.33
TUNE_EPOCHS = 2  # the tuned rows' passes over the calibration samples
IDLE_S = 0.5  # pause before each timed run (interleaved_rounds' idle_s)


def scaling_line(label: str, many: Rates, one: Rates, threads: int) -> str:
    ratio = paired_ratio(many, one)
    return (f"{label}, 1 thread: {one.tok_s:.1f} tok/s; {threads} threads: {many.tok_s:.1f} (per-round ratio, "
            f"median: {ratio.median:.2f}x; middle half of the rounds {ratio.spread})")


# ---- PyTorch eager ---------------------------------------------------------------------------------
def eager(module: Any, prompt: list[int], new: int) -> Runner:
    import torch

    ids = torch.tensor([prompt])

    def run() -> tuple[float, list[float]]:
        with torch.no_grad():
            t = time.perf_counter()
            module(ids)  # the prefill alone: time to the first token's logits
            first = time.perf_counter() - t
            t = time.perf_counter()
            module.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            total = time.perf_counter() - t
        return first, [(total - first) / (new - 1)] * (new - 1)

    return run


# ---- this tool ---------------------------------------------------------------------------------------
def export(work: Path, name: str, options: dict[str, Any], threads: int) -> tuple[Path, dict[str, Any]]:
    """The host artifact of ``options`` (``slm_export.export``'s keywords: the CLI's plan and defaults), built in
    a fresh process without validation (this script scores every row itself), and its report; an artifact
    already in ``work`` is reused."""
    from slm_export.validation.validate import ValidationSettings

    out = work / name
    if (out / "report.json").is_file():
        return out, json.loads((out / "report.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    try:
        report = in_fresh_process(export_report, "smollm2-135m", "host", out, validate=False,
                                  settings=ValidationSettings(threads=threads), **options)
    except Exception as exc:
        raise SystemExit(f"export {name} failed: {type(exc).__name__}: {exc}") from None
    print(f"  exported {name} in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return out, report


def ours(out: Path, report: dict[str, Any], prompt: list[int], new: int, threads: int) -> tuple[Runner, Any, Path]:
    from slm_export.runner.onnx_run import OnnxDecoder, make_session

    path = out / (report["compile"].get("runtime_model") or "model.onnx")
    dec = OnnxDecoder(make_session(path, threads))

    def run() -> tuple[float, list[float]]:
        _, timing = dec.generate(prompt, new)
        return timing.prefill_s, timing.decode_s

    return run, dec, path


def decode_args(ap: argparse.ArgumentParser, windows: int) -> None:
    """The flags the decode benchmarks share (bench_decode, bench_runtimes, bench_front): threads, prompt and
    generated tokens, interleaved rounds, evaluation windows and the folder that keeps the artifacts."""
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--windows", type=int, default=windows, help="windows of 512 tokens for perplexity (each text)")
    ap.add_argument("--work", type=Path, help="keep (and reuse) the artifacts in this folder")


def work_folder(args: argparse.Namespace) -> tempfile.TemporaryDirectory | None:  # type: ignore[type-arg]
    """``--work`` made ready, or a temporary folder in its place (returned, for the caller to clean up)."""
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory()
        args.work = Path(tmp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    return tmp


def main() -> int:
    ap = argparse.ArgumentParser()
    decode_args(ap, windows=8)
    ap.add_argument("--calib-samples", type=int, help="calibration samples for the int4 rows (default: the profile's)")
    ap.add_argument("--rows", help="comma-separated subset of this tool's rows (fp32, int8, int4 always; "
                    "'int4 + int8 head', 'int4 + int4 head', 'int4 + float head', 'int4 sym', "
                    "'int4 sym + int4 head', 'int4 tuned', 'int4 sym + int4 head tuned')")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from slm_export.models import load_model
    from slm_export.validation.metrics import decoder_accuracy

    torch.set_num_threads(args.threads)
    tmp = work_folder(args)
    int4: dict[str, Any] = {"precision": "int4", **({"method": "rtn"} if args.quick else {})}
    if args.calib_samples and not args.quick:
        int4["calib_samples"] = args.calib_samples
    # int4: the host default, its LM head int4 with the rows the calibration text reads most int8 too (both
    # GPTQ-rounded on the head's inputs); an int8 head (the default before), an int4 head (as ONNX Runtime
    # GenAI's builder does) and the float head (the tied table read every token) beside it.
    # Each build: slm_export.export's keywords (the CLI's flags by their Python names) for the host target.
    builds: dict[str, dict[str, Any]] = {
        "fp32": {"precision": "fp32"}, "int8": {"precision": "int8"}, "int4": int4,
        "int4 + int8 head": {**int4, "lm_head_bits": 8},
        "int4 + int4 head": {**int4, "lm_head_bits": 4},
        "int4 + float head": {**int4, "lm_head_bits": 0},
        # symmetric int4 (no zero points): ONNX Runtime's decode (M=1) int4 kernel for AVX2 handles only
        # this form; with zero points it takes the general path (see README, Decode speed)
        "int4 sym": {**int4, "symmetric": True},
        "int4 sym + int4 head": {**int4, "symmetric": True, "lm_head_bits": 4},
        # the same formats after end-to-end tuning of their norms and group scales (same speed)
        "int4 tuned": {**int4, "tune_epochs": TUNE_EPOCHS},
        "int4 sym + int4 head tuned": {**int4, "symmetric": True, "lm_head_bits": 4, "tune_epochs": TUNE_EPOCHS}}
    if args.rows:
        wanted = [r.strip() for r in args.rows.split(",")]
        unknown = set(wanted) - set(builds)
        if unknown or not {"fp32", "int8", "int4"} <= set(wanted):
            raise SystemExit(f"--rows: choose from {', '.join(builds)} (fp32, int8 and int4 always)")
        builds = {k: v for k, v in builds.items() if k in wanted}
    print("exporting ...", file=sys.stderr, flush=True)
    built = {name: export(args.work, "ours-" + "".join(c if c.isalnum() else "_" for c in name)
                          + ("-quick" if args.quick and name.startswith("int4") else ""), options, args.threads)
             for name, options in builds.items()}
    outs = {name: out for name, (out, _) in built.items()}
    model = load_model("smollm2-135m")
    genai_dir = genai_export(args.work, model, args.threads)
    module = model.torch_module()
    prompt, windows = prompt_and_windows(model.tokenizer, args.prompt, args.windows)

    def reference(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(ids)).logits.numpy()

    bandwidth = stream_read_gbs(args.threads)
    runs: dict[str, Runner] = {"eager": eager(module, prompt, args.new)}
    meta: dict[str, dict[str, Any]] = {"eager": {"name": "PyTorch eager fp32 (generate)", "ppl": 0.0, "kl": 0.0,
                                                  "bytes": model.weight_bytes}}
    for name, out in outs.items():
        print(f"scoring ours {name} ...", file=sys.stderr, flush=True)
        report = built[name][1]
        runs[name], dec, path = ours(out, report, prompt, args.new, args.threads)
        acc = decoder_accuracy(reference, dec, windows)
        meta[name] = {"name": f"slm-export {name} ({path.name})", "ppl": acc["perplexity_change_pct"],
                      "kl": acc["mean_kl"], "bytes": report["roofline"]["weight_bytes_read_per_token"]}
    runs["int4, 1 thread"] = ours(outs["int4"], built["int4"][1], prompt, args.new, 1)[0]
    if genai_dir is not None:
        print("scoring ONNX Runtime GenAI int4 ...", file=sys.stderr, flush=True)
        runs["genai"] = genai_runner(genai_dir, prompt, args.new)
        # the peer's own scaling, beside ours: the 2-thread goal is a property of the runtime as much as the graph
        runs["genai, 1 thread"] = genai_runner(genai_dir, prompt, args.new, threads=1)
        acc = decoder_accuracy(reference, GenAIScorer(genai_dir / "model.onnx", args.threads), windows)
        meta["genai"] = {"name": "ONNX Runtime GenAI int4 (builder, RTN, accuracy level 4)",
                         "ppl": acc["perplexity_change_pct"], "kl": acc["mean_kl"],
                         "bytes": bytes_read_per_token(genai_dir / "model.onnx")}
    llama = llama_cpp_runner(prompt, args.new, args.threads)
    if llama is not None:
        runs["llama"] = llama
        meta["llama"] = {"name": "llama.cpp (the built-in GGUF, Q4_1)", "ppl": None, "kl": None, "bytes": None}
    print(f"timing {len(runs)} systems, {args.repeats} interleaved rounds ...", file=sys.stderr, flush=True)
    # IDLE_S before each timed run: ONNX Runtime's and OpenMP's workers spin for a while after a run, and on 2
    # cores that took the next system's prefill from 79 to 107 ms (int4 right after int8, measured 2026-12-04),
    # a cost no system pays when it runs alone.
    rates = interleaved_rounds(runs, args.repeats, idle_s=IDLE_S)
    rows: list[dict[str, Any]] = [{**meta[k], "tok_s": rates[k].tok_s, "ttft_s": rates[k].ttft_s, "key": k}
                                  for k in runs if k in meta]
    one_thread = rates["int4, 1 thread"]

    eager_rate = rows[0]["tok_s"]
    import onnxruntime

    print(f"## smollm2-135m decode, {args.threads} threads, prompt {len(prompt)} tokens, {args.new} new tokens, "
          f"median of {args.repeats} interleaved rounds after a warm-up; onnxruntime {onnxruntime.__version__}")
    print(cpu_line())
    print(f"STREAM-like read now: {bandwidth:.1f} GB/s ({args.threads} threads, float32 sum of a 2 GiB buffer); "
          f"perplexity change and mean KL(float32 || system) per token on {len(windows)} x 512 evaluation tokens "
          "against PyTorch float32 (KL varies less between runs than the perplexity change)")
    cells = []
    for r in rows:
        r["roof"] = bandwidth * 1e9 / r["bytes"] if r.get("bytes") else None
        cells.append([r["name"], f"{r['tok_s']:.1f}", f"{r['tok_s'] / eager_rate:.2f}", f"{r['ttft_s'] * 1e3:.0f}",
                      "-" if r["ppl"] is None else f"{r['ppl']:+.2f}%", "-" if r["kl"] is None else f"{r['kl']:.4f}",
                      f"{r['bytes'] / 1e6:.0f}" if r.get("bytes") else "-",
                      f"{r['roof']:.0f}" if r["roof"] else "-",
                      f"{r['tok_s'] / r['roof']:.2f}" if r["roof"] else "-"])
    print_table(["system", "decode tok/s", "x eager", "TTFT ms", "ppl change", "mean KL", "weight MB read/token",
                 "roofline tok/s", "of roofline"], cells)
    by = {r.get("key"): r for r in rows}
    scaling = paired_ratio(rates["int4"], one_thread).median
    cost = zero_point_cost(outs["int4"] / "model.onnx", args.threads)
    print("\nint4 MatMulNBits, one token, time with zero points (asymmetric, the int4 default) over without "
          "(symmetric), the int4 artifact's shapes, same threads: "
          + ", ".join(f"N={n} K={k} {r:.2f}x" for (n, k), r in cost.items()))
    print(scaling_line("int4", rates["int4"], one_thread, args.threads))
    if "genai, 1 thread" in rates:
        print(scaling_line("GenAI int4", rates["genai"], rates["genai, 1 thread"], args.threads))
    checks = {
        "fp32 >= 2.5x eager": by["fp32"]["tok_s"] >= 2.5 * eager_rate,
        "int8 >= 6x eager": by["int8"]["tok_s"] >= 6 * eager_rate,
        "int4 >= 70% of its roofline": by["int4"]["tok_s"] >= 0.7 * by["int4"]["roof"],
        "int8 >= 70% of its roofline": by["int8"]["tok_s"] >= 0.7 * by["int8"]["roof"],
        "int4: 2 threads >= 1.6x 1 thread": scaling >= 1.6,
        f"int4 perplexity change <= +{COMPRESSION_PPL}% (the compression issue's int4)":
            by["int4"]["ppl"] is not None and by["int4"]["ppl"] <= COMPRESSION_PPL,
    }
    if "genai" in by:
        g = by["genai"]
        ratios = paired_ratios(rates, "genai", [k for k in outs if k.startswith("int4")])
        vs = {k: r.median for k, r in ratios.items()}
        print("per-round decode ratio to GenAI int4, median (middle half of the rounds): "
              + ", ".join(f"{k} {v:.3f}x ({ratios[k].spread})" for k, v in vs.items()))
        checks["int4 >= 1.0x GenAI int4"] = vs["int4"] >= 1.0
        both = [k for k in vs if vs[k] >= 1.0 and by[k]["ppl"] is not None and by[k]["ppl"] <= COMPRESSION_PPL]
        print("int4 forms at >= 1.0x GenAI and within +"
              f"{COMPRESSION_PPL}% perplexity in this run: {', '.join(both) if both else 'none'}")
        checks["int4 perplexity change <= GenAI int4's"] = by["int4"]["ppl"] <= g["ppl"]
        checks["int4 TTFT <= 1.1x GenAI's"] = by["int4"]["ttft_s"] <= 1.1 * g["ttft_s"]
    else:
        print("\nonnxruntime_genai is not installed: the GenAI rows and checks were not run "
              "(pip install onnxruntime-genai --no-deps)")
    print()
    for k, v in checks.items():
        print(f"{'PASS' if v else 'FAIL'}  {k}")
    if tmp is not None:
        tmp.cleanup()
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
