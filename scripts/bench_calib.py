"""How long the compress stage of a plan takes, against another commit of this tool, in one run.

    .venv/bin/python scripts/bench_calib.py [--against REF] [--rounds 2] [--samples 64] [--threads 2]
                                            [--target host] [--precision int4] [--work DIR]

For smollm2-135m, each round runs the compress stage of the plan (the CLI's plan for ``--target`` and
``--precision``: the int4 default is AWQ+GPTQ, group 32, the LM head int4 with int8 hot rows) once at this
checkout and once at ``--against`` (a git worktree made under ``--work``), in alternating order, each in a fresh
process with ``--threads`` torch threads and nothing else of the bench running. It prints each run's seconds
(the layers and the whole stage), the median ratio, and whether the two commits' codes, scales and float
tensors are identical (or how many codes differ): a speed-up that changes the result says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUN = r"""
import json, sys, time
import numpy as np, torch
from slm_export.calibration.compress import compress
from slm_export.calibration.quant import QuantizedTensor
from slm_export.models import load_model
from slm_export.planning import make_plan
from slm_export.targets import get_target

target, precision, samples, threads, dump = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(threads)
plan = make_plan(get_target(target), "smollm2-135m", dump + ".unused", precision=precision, calib_samples=samples)
model = load_model("smollm2-135m")
marks = {}
t0 = time.perf_counter()
result = compress(model, plan, lambda what: marks.setdefault(what.split(",")[0], time.perf_counter() - t0))
total = time.perf_counter() - t0
layers = max((v for k, v in marks.items() if k.startswith("layer ")), default=total)
arrays = {}
for name, w in result.weights.items():
    if isinstance(w, QuantizedTensor):
        arrays[name + ".codes"], arrays[name + ".scales"] = w.codes, w.scales
        if w.zeros is not None:
            arrays[name + ".zeros"] = w.zeros
    elif isinstance(w, torch.Tensor) and w is not model.weights.get(name):  # a float tensor the stage changed
        arrays[name] = w.detach().float().numpy()
np.savez(dump, **arrays)
print(json.dumps({"total_s": total, "layers_s": layers, "method": plan.method, "group": plan.group_size,
                  "lm_head_bits": plan.lm_head_bits, "samples": samples, "seqlen": plan.calib_seqlen}))
"""


def run_once(tree: Path, args: argparse.Namespace, dump: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run([sys.executable, "-c", RUN, args.target, args.precision, str(args.samples),
                           str(args.threads), str(dump)], env=env, capture_output=True, text=True, cwd=tree)
    if done.returncode != 0:
        sys.exit(f"the compress run in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(a: Path, b: Path) -> str:
    import numpy as np

    x, y = np.load(a), np.load(b)
    if set(x.files) != set(y.files):
        return f"different tensors: {sorted(set(x.files) ^ set(y.files))[:4]}"
    codes = [k for k in x.files if k.endswith(".codes")]
    differ = sum(int((x[k] != y[k]).sum()) for k in codes)
    total = sum(x[k].size for k in codes)
    rest = [k for k in x.files if not k.endswith(".codes") and not np.array_equal(x[k], y[k])]
    if not differ and not rest:
        return "identical (every code, scale, zero point and changed float tensor)"
    return f"{differ} of {total} codes differ ({differ / max(total, 1):.4%}); other tensors differing: {len(rest)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", default=None, help="a git commit to compare with (default: none, this checkout only)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", default="host")
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-calib-"))
    work.mkdir(parents=True, exist_ok=True)
    trees = {"this checkout": ROOT}
    if args.against:
        ref = work / "against"
        if not ref.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(ref), args.against],
                           check=True, capture_output=True)
        trees[f"against {args.against}"] = ref
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    print(f"## compress stage, smollm2-135m, {args.target} {args.precision}, {args.samples} x 512 calibration, "
          f"{args.threads} threads; this checkout {head}")
    results: dict[str, list[dict]] = {k: [] for k in trees}
    for r in range(args.rounds):
        order = list(trees.items()) if r % 2 == 0 else list(trees.items())[::-1]
        for name, tree in order:
            got = run_once(tree, args, work / f"{name.split()[0]}-{r}.npz")
            results[name].append(got)
            print(f"round {r + 1}: {name}: layers {got['layers_s']:.1f} s, stage {got['total_s']:.1f} s "
                  f"({got['method']}, group {got['group']}, head int{got['lm_head_bits']})", flush=True)
    for name, runs in results.items():
        print(f"{name}: stage median {statistics.median(x['total_s'] for x in runs):.1f} s, layers median "
              f"{statistics.median(x['layers_s'] for x in runs):.1f} s")
    if args.against:
        names = list(trees)
        ratios = [b["total_s"] / a["total_s"] for a, b in zip(results[names[0]], results[names[1]], strict=True)]
        print(f"speed-up over {args.against} (its stage time over this one's, per round): median "
              f"{statistics.median(ratios):.2f}x {[round(x, 2) for x in ratios]}")
        print("result:", compare(work / "this-0.npz", work / "against-0.npz"))


if __name__ == "__main__":
    main()
