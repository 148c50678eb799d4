#!/usr/bin/env python
"""Issue-4 figures on smollm2-135m: every built-in target's artifact, every runtime it carries, one run.

Each export runs through the CLI's plan (``slm_export.export``: ``make_plan`` then ``run``) in a fresh process,
with the validation, cross-checks and emulated runs the profile implies; this script reads the reports and
prints one table (what ran, where, its perplexity change, whether its greedy continuation equals PyTorch's, its
decode rate) and the issue's checks. PyTorch eager ``generate`` is timed in the same run for the ExecuTorch
speed ratio (``slm_export.bench``'s rounds).

Usage: python scripts/bench_backends.py [--threads 2] [--quick]   (--quick: the fp32 rows only)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from slm_export.bench import export_report, in_fresh_process, interleaved_rounds, print_table

RUNS: list[tuple[str, str, dict[str, Any]]] = [  # (name, target, slm_export.export's keywords: the CLI's flags)
    ("host fp32", "host", {"precision": "fp32"}),
    ("rpi4b fp32", "rpi4", {"precision": "fp32", "emulate": "on"}),
    ("android fp32", "android", {"precision": "fp32", "emulate": "on"}),
    ("jetson-tx2 fp16 (default)", "jetson", {}),
    ("rpi4b int4 (default)", "rpi4", {"emulate": "on"}),
    ("android int4 (default)", "android", {"emulate": "on"}),
    ("a100 int8 W8A8 + 2:4", "a100", {"precision": "int8", "sparsity": "2:4"}),
    ("fpga int8 (default)", "fpga", {}),
]


def export(target: str, options: dict[str, Any], out: Path, threads: int) -> tuple[dict[str, Any], float]:
    """The report of one export (validated, as the CLI validates) in a fresh process, and the process's wall time."""
    from slm_export.validation.validate import ValidationSettings

    t = time.perf_counter()
    try:
        report = in_fresh_process(export_report, "smollm2-135m", target, out,
                                  settings=ValidationSettings(threads=threads), **options)
    except Exception as exc:
        raise SystemExit(f"{target} {options} failed: {type(exc).__name__}: {exc}") from None
    return report, time.perf_counter() - t


def rows_of(name: str, r: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per runtime file the report measured: the validated file, cross-checks, emulated runs."""
    m = r["metrics"]

    def get(key: str) -> Any:
        return m.get(key, {}).get("value")

    rows = [{"artifact": name, "file": r["validated_file"], "where": "host", "windows": "8 x 512",
             "ppl_change": get("perplexity_change_pct"), "greedy_ref": get("greedy_match"), "vs_validated_pp": None,
             "agree_host": None, "tok_s": get("decode_tokens_per_s_p50")}]
    for d in r.get("crosschecks", []) + r.get("emulation", []):
        if d.get("status") != "done":
            continue
        p, v = d["prefix"], d["versus_label"]
        rows.append({"artifact": name, "file": d["file"], "where": "emulated" if d["runner"] == "emulator" else "host",
                     "windows": " x ".join(map(str, d["windows"])), "ppl_change": get(f"{p}_perplexity_change_pct"),
                     "greedy_ref": get(f"{p}_greedy_equals_reference"),
                     "vs_validated_pp": get(f"{p}_perplexity_change_vs_{v}_pp"),
                     "agree_host": get(f"{p}_agreement_with_{v}"), "tok_s": get(f"{p}_decode_tokens_per_s_p50")})
    return rows


def eager_rate(threads: int, n: int = 128, rounds: int = 3) -> float:
    """PyTorch eager ``generate``'s tokens/s (n over the whole call's wall), median of ``rounds`` after a warm-up."""
    import torch

    from slm_export.models import load_model

    torch.set_num_threads(threads)
    model = load_model("smollm2-135m")
    module = model.torch_module()
    ids = torch.tensor([model.tokenizer("Write a short story about a robot:").input_ids])

    def run() -> tuple[float, list[float]]:
        with torch.no_grad():
            t = time.perf_counter()
            module.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            wall = time.perf_counter() - t
        return wall, [wall / n] * n

    def warmup() -> None:
        with torch.no_grad():
            module.generate(ids, max_new_tokens=8, do_sample=False)

    return interleaved_rounds({"eager": run}, rounds, warmup={"eager": warmup}, log=None)["eager"].tok_s


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the fp32 rows only")
    args = ap.parse_args()
    runs = [r for r in RUNS if "fp32" in r[0]] if args.quick else RUNS
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, target, options in runs:
            print(f"exporting {name} ...", file=sys.stderr, flush=True)
            reports[name] = export(target, options, Path(tmp) / name.split()[0], args.threads)
    eager = eager_rate(args.threads)
    rows = [row for name, (r, _) in reports.items() for row in rows_of(name, r)]
    print(f"## smollm2-135m, every target's runtimes, {args.threads} threads, one run")
    print("ppl change against PyTorch float32 on the windows shown; 'vs validated' is the gap to the file the host "
          "validated, on the same windows (emulated rows: to the host run of the same file)")
    fmt = lambda v, f: "-" if v is None else format(v, f) if not isinstance(v, bool) else str(v)  # noqa: E731
    print_table(["artifact", "file", "where", "windows", "ppl change", "greedy = PyTorch", "vs validated (pp)",
                 "top-1 = host", "decode tok/s"],
                [[x["artifact"], x["file"], x["where"], x["windows"], f"{fmt(x['ppl_change'], '+.3f')}%",
                  fmt(x["greedy_ref"], ""), fmt(x["vs_validated_pp"], "+.3f"), fmt(x["agree_host"], ".4f"),
                  fmt(x["tok_s"], ".1f")] for x in rows])
    print(f"\nPyTorch eager generate, fp32, same machine and threads: {eager:.1f} tok/s")
    print()
    print_table(["artifact", "wall s", "verdict", "stages (s)"],
                [[name, f"{wall:.0f}", r["verdict"], ", ".join(f"{s['name']} {s['seconds']:.0f}" for s in r["stages"])]
                 for name, (r, wall) in reports.items()])
    checks: dict[str, bool] = {}
    for x in rows:
        if "fp32" in x["artifact"] or "fp16" in x["artifact"]:
            checks[f"{x['artifact']} {x['file']} ({x['where']}): greedy equals PyTorch"] = x["greedy_ref"] is True
        elif x["vs_validated_pp"] is not None:
            checks[f"{x['artifact']} {x['file']} ({x['where']}): within 0.5 pp"] = abs(x["vs_validated_pp"]) <= 0.5
        if x["where"] == "emulated" and "rpi4b" in x["artifact"] and x["agree_host"] is not None:
            checks[f"{x['artifact']} {x['file']} emulated: top-1 agrees with host >= 99%"] = x["agree_host"] >= 0.99
    for name, (r, _) in reports.items():
        if r.get("validated_file") == "model.pte":
            rate = r["metrics"]["decode_tokens_per_s_p50"]["value"]
            checks[f"{name} .pte decode >= PyTorch eager ({rate:.1f} vs {eager:.1f} tok/s)"] = rate >= eager
    print()
    for k, v in checks.items():
        print(f"{'PASS' if v else 'FAIL'}  {k}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
