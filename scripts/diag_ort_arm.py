#!/usr/bin/env python
"""Why an ORT artifact's emulated aarch64 run parts from its host run: the same 256-token window scored on
the host and under qemu-aarch64 with the profile's CPU, each with ONNX Runtime's KleidiAI kernels on
(the default a phone build uses) and off (session option ``mlas.disable_kleidiai``).

On a dot-product core ORT runs a symmetric int4 MatMulNBits at accuracy level 4 through KleidiAI, which
quantizes each activation row with one asymmetric int8 scale over all of K (and carries the weight
scales as bf16); x86 quantizes per 32-value block, symmetric. With KleidiAI off, aarch64 quantizes per
block as x86 does, and what is left between the two is rounding (ties away vs ties to even) and order.

Usage: python scripts/diag_ort_arm.py ARTIFACT_FOLDER [--file model.ort] [--target android] [--tokens 256]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from slm_export.bench import print_table
from slm_export.models import load_model
from slm_export.runner.job import SCHEMA, run_job, score_window
from slm_export.targets import get_target
from slm_export.text import load_text, token_windows
from slm_export.validation.emulator import EmulatorRunner


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--file", default="model.ort")
    ap.add_argument("--target", default="android")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    m = load_model(a.model)
    windows = token_windows(m.tokenizer, load_text(None, "evaluation"), 1, a.tokens)
    off = {"mlas.disable_kleidiai": "1"}
    runner = EmulatorRunner(get_target(a.target))
    res = {}
    for name, where, cfg in [("host", "host", None), ("host, KleidiAI off", "host", off),
                             (f"{runner.cpu}", "emu", None), (f"{runner.cpu}, KleidiAI off", "emu", off)]:
        job = {"schema": SCHEMA, "model": a.file, "threads": a.threads, "windows": windows,
               **({"ort_config": cfg} if cfg else {})}
        t = time.perf_counter()
        res[name] = run_job(job, a.folder) if where == "host" else runner.run(a.folder, job)
        print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
    pte = a.folder / "model.pte"
    if pte.is_file():  # the phone's other runtime: XNNPACK's 8da4w, per-token asymmetric int8 activations
        job = {"schema": SCHEMA, "model": pte.name, "threads": a.threads, "windows": windows}
        res["host, model.pte (ExecuTorch)"] = run_job(job, a.folder)
    import torch

    ids = np.asarray(windows[0], np.int64)
    with torch.no_grad():
        ref = score_window(m.torch_module()(torch.from_numpy(ids[None])).logits.float().numpy()[0], ids)
    ppl = {name: float(np.exp(r["windows"][0]["nll"] / r["windows"][0]["n"])) for name, r in res.items()}
    p_ref = float(np.exp(ref["nll"] / ref["n"]))
    change = {name: 100 * (v / p_ref - 1) for name, v in ppl.items()}
    host = np.array(res["host"]["windows"][0]["argmax"])
    print(f"\n{a.file}, {a.tokens} evaluation tokens, {a.threads} threads; PyTorch float32 perplexity {p_ref:.3f}")
    print_table(["run", "perplexity", "change vs PyTorch", "vs host run (pp)", "top-1 agreement with host"],
                [[name, f"{ppl[name]:.3f}", f"{change[name]:+.2f}%", f"{change[name] - change['host']:+.2f}",
                  f"{np.mean(np.array(r['windows'][0]['argmax']) == host):.4f}"] for name, r in res.items()])
    if pte.is_file():
        t = np.array(res["host, model.pte (ExecuTorch)"]["windows"][0]["argmax"])
        for name, r in res.items():
            print(f"{name}: top-1 agreement with model.pte {np.mean(np.array(r['windows'][0]['argmax']) == t):.4f}, "
                  f"{change[name] - change['host, model.pte (ExecuTorch)']:+.2f} pp from it")


if __name__ == "__main__":
    main()
