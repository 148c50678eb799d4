#!/usr/bin/env python
"""Issue-3 figures on smollm2-135m, measured in one run against the float32 artifact.

Each row is built by ``slm_export.export`` for the host target (``make_plan`` then ``run``: the CLI's plan, so
each row gets the CLI's defaults for what it does not set; every weight-only row sets a float LM head, as the
rows were first measured) in a fresh process,
so that its time and peak RSS are its own; its calibration time and peak RSS are its report's stage records,
its size and bits per weight its report's too. Then every artifact's graph (model.onnx) is scored here on the
evaluation half of the built-in text (8 x 512 tokens) against the PyTorch float32 reference, and its decode
speed is timed through the project's loop (``slm_export.bench``'s rounds).

The rows are built without validation and scored here rather than read from a validated report: a host
report validates the ORT-optimized graph (model.optimized.onnx), in which ONNX Runtime has already fused the
W8A8 static rows' Q/DQ pairs into its x86 int8 kernels, while those rows are scored as exact int8 products
(the TensorRT arithmetic); scoring every row here keeps one scorer for all of them.

Usage: python scripts/bench_compress.py [--samples 128] [--seqlen 512] [--threads 2] [--quick]
                                        [--rows "int8 RTN g32,W8A8 dynamic per-token"]
  --rows: only these rows (fp32 always, as the reference); the checks that need a row left out say
  "not run" instead of passing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from slm_export.bench import export_report, in_fresh_process, interleaved_rounds, print_table

DECODE_ROUNDS, DECODE_TOKENS = 3, 128  # each row's decode speed: the median of 3 runs of 128 tokens


def folder(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def exact_qdq(name: str) -> bool:
    """W8A8 static is the a100 (TensorRT) form: scored with its Q/DQ pairs as exact int8 products, not through
    ORT's x86 int8 kernels, which saturate without VNNI."""
    return name.startswith("W8A8 static")


def build(name: str, options: dict[str, Any], out: Path) -> dict[str, Any]:
    """The row's artifact and report: ``slm_export.export`` for the host target in a fresh process, without
    validation (``main`` scores every row)."""
    try:
        return in_fresh_process(export_report, "smollm2-135m", "host", out, validate=False, **options)
    except Exception as exc:
        raise SystemExit(f"{name} ({options}) failed: {type(exc).__name__}: {exc}") from None


def figures(report: dict[str, Any]) -> dict[str, Any]:
    """What the table reads from a row's report: calibration time (compress and budget stages) and peak RSS
    (through calibration: the last of load, compress and budget; through export) from its stage records, size
    and bits per weight from its artifact and compression sections."""
    stages = {s["name"]: s for s in report["stages"]}
    mb = 1024 * 1024  # the stage records' peak RSS is ru_maxrss / 1024: MiB
    calib = [stages[n] for n in ("load", "compress", "budget") if n in stages]
    upto_export = [s for n, s in stages.items() if n in ("load", "compress", "budget", "export")]
    info: dict[str, Any] = {
        "calib_s": sum(s["seconds"] for s in calib if s["name"] != "load"),
        "total_s": sum(s["seconds"] for s in upto_export),
        "bytes": report["artifact"]["bytes"], "weight_bytes": report["model"]["float32_weight_bytes"],
        "calib_peak_rss_bytes": calib[-1]["peak_rss_mb"] * mb, "peak_rss_bytes": stages["export"]["peak_rss_mb"] * mb}
    compression = report.get("compression")
    if compression:
        info["bits_per_weight"] = compression["bits_per_weight"]  # None when only pruned: stored dense fp32
        budget = compression.get("budget")
        if budget:
            info["nominal_bits"] = budget["nominal_bits_per_weight"]
            info["kept_int8"] = len(budget["kept_int8"])
    return info


def decode_rate(dec: Any, prompt: list[int]) -> float:
    """Decode tokens/s of a decoder through the project's loop: a warm-up of 8 tokens, then the median of
    ``DECODE_ROUNDS`` runs of ``DECODE_TOKENS`` (``slm_export.bench.interleaved_rounds``, one system)."""

    def run() -> tuple[float, list[float]]:
        _, timing = dec.generate(prompt, DECODE_TOKENS)
        return timing.prefill_s, timing.decode_s

    rates = interleaved_rounds({"row": run}, DECODE_ROUNDS, warmup={"row": lambda: dec.generate(prompt, 8)}, log=None)
    return rates["row"].tok_s


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="16 calibration samples (a smoke run, not the figures)")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep the artifacts (each with its report.json) and each build's figures (NAME.build.json "
                         "beside its folder) here instead of a temporary folder, and print each scored row to "
                         "stderr as it finishes")
    ap.add_argument("--rows", help="comma-separated row names to build and score (fp32 always); default: all")
    args = ap.parse_args()
    n = 16 if args.quick else args.samples
    calib = {"calib_samples": n, "calib_seqlen": args.seqlen}
    # Each row: slm_export.export's keywords (the CLI's flags by their Python names) for the host target; what a
    # row leaves out takes the CLI's default (the LM head's width, the observer, ...).
    runs: dict[str, dict[str, Any]] = {
        "fp32": {"precision": "fp32"},
        "int8 RTN g32": {"precision": "int8", "method": "rtn", "group_size": 32},
        "int4 RTN g32 asym": {"precision": "int4", "method": "rtn", "group_size": 32},
        "int4 RTN g32 sym": {"precision": "int4", "method": "rtn", "group_size": 32, "symmetric": True,
                             "signed_scales": False},
        # signed scales: what --symmetric makes on host and rpi4b (ONNX Runtime and TVM); android keeps unsigned
        "int4 RTN g32 sym signed": {"precision": "int4", "method": "rtn", "group_size": 32, "symmetric": True,
                                    "signed_scales": True},
        "int4 GPTQ g32": {"precision": "int4", "method": "gptq", "group_size": 32, **calib},
        "int4 AWQ g32": {"precision": "int4", "method": "awq", "group_size": 32, "calib_samples": min(n, 64),
                         "calib_seqlen": args.seqlen},
        # The int4 default: AWQ's scales, then GPTQ's rounding; symmetric is android's form (XNNPACK).
        "int4 AWQ+GPTQ g32": {"precision": "int4", "method": "awq-gptq", "group_size": 32,
                              "calib_samples": min(n, 64), "calib_seqlen": args.seqlen},
        "int4 AWQ+GPTQ g32 sym": {"precision": "int4", "method": "awq-gptq", "group_size": 32, "symmetric": True,
                                  "signed_scales": False, "calib_samples": min(n, 64), "calib_seqlen": args.seqlen},
        "int4 AWQ+GPTQ g32 sym signed": {"precision": "int4", "method": "awq-gptq", "group_size": 32,
                                         "symmetric": True, "signed_scales": True, "calib_samples": min(n, 64),
                                         "calib_seqlen": args.seqlen},
        "budget 5% (AWQ+GPTQ base)": {"precision": "int4", "method": "awq-gptq", "group_size": 32,
                                      "calib_samples": 64, "max_ppl_increase": 5.0},
        # W8A8 static is the a100 (TensorRT) form: scored with its Q/DQ pairs as exact int8 products
        # (exact_qdq above), not through ORT's x86 int8 kernels, which saturate without VNNI.
        "W8A8 static SmoothQuant + rotation": {"precision": "int8", "method": "smoothquant",
                                               "calib_samples": min(n, 64), "calib_seqlen": args.seqlen,
                                               "rotate": 128},
        "W8A8 static SmoothQuant, no rotation": {"precision": "int8", "method": "smoothquant",
                                                 "calib_samples": min(n, 64), "calib_seqlen": args.seqlen,
                                                 "rotate": 0},
        # The fpga (DPU) form: one power-of-two scale per tensor, weights and activations; the profile's
        # observer (mse). Same arithmetic as the static 1 x 512 fpga graph, scored on this dynamic one.
        "W8A8 static fpga form (pow2 per-tensor, mse)": {"precision": "int8", "method": "smoothquant",
                                                         "calib_samples": min(n, 64), "calib_seqlen": args.seqlen,
                                                         "rotate": 128, "pow2_scales": True, "observer": "mse"},
        "W8A8 dynamic per-token": {"precision": "int8", "method": "dynamic"},
    }
    # The rows compare the layers' methods, so every row keeps the LM head float (lm_head_bits 0), as the rows
    # in docs/benchmarks/compress.md were measured; the host default's int4 head with int8 hot rows is a row of
    # bench_decode.
    for spec in runs.values():
        if spec["precision"] in ("int8", "int4") and spec.get("method") not in ("smoothquant", "dynamic"):
            spec.setdefault("lm_head_bits", 0)
    sparse_calib = {"calib_samples": 16, "calib_seqlen": 512}
    for pattern in ("2:4", "unstructured"):
        for method in ("magnitude", "wanda", "sparsegpt"):
            runs[f"fp32 {pattern} {method}"] = {"precision": "fp32", "sparsity": pattern, "sparsity_method": method,
                                                **(sparse_calib if method != "magnitude" else {})}
    if args.rows:
        wanted = {r.strip() for r in args.rows.split(",")} | {"fp32"}
        unknown = wanted - set(runs)
        if unknown:
            raise SystemExit(f"unknown rows {sorted(unknown)}; the rows are: {', '.join(runs)}")
        runs = {k: v for k, v in runs.items() if k in wanted}
    import numpy as np
    import torch

    from slm_export.models import load_model
    from slm_export.text import builtin_split, token_windows
    from slm_export.validation.generate import OnnxDecoder, make_session
    from slm_export.validation.metrics import decoder_accuracy

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.work or Path(scratch)
        built = {}
        for name, options in runs.items():
            print(f"building {name} ...", file=sys.stderr, flush=True)
            built[name] = figures(build(name, options, Path(tmp) / folder(name)))
            (Path(tmp) / f"{folder(name)}.build.json").write_text(json.dumps(built[name]))
        model = load_model("smollm2-135m")
        module = model.torch_module()
        windows = token_windows(model.tokenizer, builtin_split("evaluation"), 8, 512)

        def reference(ids: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.from_numpy(ids)).logits.numpy()

        prompt = model.tokenizer("Write a short story about a robot:").input_ids
        for name, info in built.items():
            dec = OnnxDecoder(make_session(Path(tmp) / folder(name) / "model.onnx", args.threads,
                                           exact_qdq=exact_qdq(name)))
            acc = decoder_accuracy(reference, dec, windows)
            rate = decode_rate(dec, prompt)
            rows.append((name, acc, rate, info))
            print(f"scored {name}: {acc['perplexity']:.3f} ({acc['perplexity_change_pct']:+.2f}%), "
                  f"{rate:.1f} tok/s, {json.dumps(info)}", file=sys.stderr, flush=True)
    fp32_rate = rows[0][2]
    print(f"## smollm2-135m, evaluation half of the built-in text (8 x 512), calibration {n} x {args.seqlen}, "
          f"{args.threads} threads")
    print("W8A8 static rows: Q/DQ run as exact int8 products (the TensorRT arithmetic); decode speed of those "
          "rows is the float emulation's, not a device figure")
    print("peak RSS over the float32 weight bytes: through calibration (load + compress), and through export")
    print("mean KL: KL(float32 || artifact) per token on the same windows (it varies less between builds than "
          "the perplexity change)")
    cells = []
    for name, acc, rate, info in rows:
        rss_c = info["calib_peak_rss_bytes"] / info["weight_bytes"]
        rss_x = info["peak_rss_bytes"] / info["weight_bytes"]
        bits = f"{info.get('bits_per_weight') or 32:.2f}" + (
            f" (nominal {info['nominal_bits']:.2f}, {info['kept_int8']} groups int8)" if "nominal_bits" in info else "")
        cells.append([name, f"{acc['perplexity']:.3f}", f"{acc['perplexity_change_pct']:+.2f}%",
                      f"{acc['mean_kl']:.4f}", f"{acc['top1_agreement']:.3f}", f"{info['calib_s']:.0f}",
                      f"{rss_c:.2f}x / {rss_x:.2f}x",
                      f"{info['bytes'] / 1e6:.0f}", bits, f"{rate:.1f}", f"{rate / fp32_rate:.2f}"])
    print_table(["artifact", "perplexity", "change", "mean KL", "top-1 agree", "calib s", "peak RSS calib / export",
                 "size MB", "bits/weight (stored)", "decode tok/s", "x fp32"], cells)
    change = {name: acc["perplexity_change_pct"] for name, acc, _, _ in rows}
    kl = {name: acc["mean_kl"] for name, acc, _, _ in rows}
    info = dict((name, i) for name, _, _, i in rows)
    checks: dict[str, Any] = {
        "int8 weight-only <= +0.3%": lambda: change["int8 RTN g32"] <= 0.3,
        "int4 GPTQ <= +10%": lambda: change["int4 GPTQ g32"] <= 10,
        "int4 AWQ <= +10%": lambda: change["int4 AWQ g32"] <= 10,
        "GPTQ better than RTN (asym and sym)": lambda: change["int4 GPTQ g32"] < min(change["int4 RTN g32 asym"],
                                                                                     change["int4 RTN g32 sym"]),
        "AWQ better than RTN (asym and sym)": lambda: change["int4 AWQ g32"] < min(change["int4 RTN g32 asym"],
                                                                                   change["int4 RTN g32 sym"]),
        "AWQ+GPTQ <= +10%, better than AWQ and GPTQ": lambda: change["int4 AWQ+GPTQ g32"]
        <= min(10, change["int4 AWQ g32"], change["int4 GPTQ g32"]),
        "AWQ+GPTQ symmetric <= +10%, better than RTN symmetric": lambda: change["int4 AWQ+GPTQ g32 sym"]
        <= min(10, change["int4 RTN g32 sym"]),
        "signed scales lower symmetric int4's mean KL (RTN and AWQ+GPTQ)": lambda: kl["int4 RTN g32 sym signed"]
        < kl["int4 RTN g32 sym"] and kl["int4 AWQ+GPTQ g32 sym signed"] < kl["int4 AWQ+GPTQ g32 sym"],
        "GPTQ calibration < 600 s": lambda: info["int4 GPTQ g32"]["calib_s"] < 600,
        "GPTQ calibration peak RSS <= 3x fp32 weights": lambda: info["int4 GPTQ g32"]["calib_peak_rss_bytes"]
        <= 3 * info["int4 GPTQ g32"]["weight_bytes"],
        "int8 and int4 (weight-only, CPU) decode faster than fp32": lambda: all(
            r > fp32_rate for nm, _, r, _ in rows if nm.startswith("int")),
        "W8A8 static SmoothQuant (+ rotation) <= +2%": lambda: change["W8A8 static SmoothQuant + rotation"] <= 2,
        "W8A8 fpga form (pow2 per-tensor) <= +15%":
            lambda: change["W8A8 static fpga form (pow2 per-tensor, mse)"] <= 15,
        "budget 5% met with nominal bits <= 5": lambda: change["budget 5% (AWQ+GPTQ base)"] <= 5
        and info["budget 5% (AWQ+GPTQ base)"]["nominal_bits"] <= 5,
    }
    for pattern in ("2:4", "unstructured"):
        checks[f"{pattern}: SparseGPT <= Wanda <= magnitude"] = (
            lambda p=pattern: change[f"fp32 {p} sparsegpt"] <= change[f"fp32 {p} wanda"]
            <= change[f"fp32 {p} magnitude"])
    print()
    failed = False
    for k, check in checks.items():
        try:
            ok = bool(check())
        except KeyError:  # a row this run left out (--rows)
            print(f"not run  {k}")
            continue
        failed |= not ok
        print(f"{'PASS' if ok else 'FAIL'}  {k}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
