"""Exports of random-weight models of real shapes: peak memory and time of each, through the CLI.

    python scripts/bench_scale.py --work /tmp/scale --shapes qwen2.5-1.5b --precisions fp32,int4

Each shape is written once (bf16 safetensors shards, the built-in SmolLM2 tokenizer, so the vocabulary is
its 49,152 tokens) under --work; each export runs `slm-export --target host` in a child process, and its
peak RSS is the child's (``ru_maxrss`` of the waited process), beside its float32 weight bytes. int4 uses
round-to-nearest (`--method rtn`): calibration of a billion-parameter model on 2 cores takes hours. Random
weights make the accuracy figures meaningless; the run shows the model goes through and what it costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Real shapes (hidden size, layers, head layout) with the built-in tokenizer's vocabulary.
SHAPES = {
    "qwen2.5-1.5b": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536,
                     "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
                     "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                     "rope_theta": 1000000.0, "tie_word_embeddings": True, "hidden_act": "silu",
                     "use_sliding_window": False},
    "llama-3.2-3b": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 3072,
                     "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
                     "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072,
                     "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "hidden_act": "silu",
                     "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                     "rope_theta": 500000.0},
    "llama-3-8b": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": False, "hidden_act": "silu", "rope_theta": 500000.0},
}
SHARD_BYTES = 2 << 30


def write_shape(name: str, folder: Path) -> Path:
    """The model folder of shape ``name`` (written once): config, bf16 shards of N(0, 0.02) weights, tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from slm_export.models import load_model

    if (folder / "model.safetensors.index.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tok = load_model("smollm2-135m").tokenizer
    tok.save_pretrained(folder)
    cfg = {**SHAPES[name], "vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape)) for k, v in AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(folder)).state_dict().items()}
    if cfg["tie_word_embeddings"]:
        shapes.pop("lm_head.weight", None)
    gen = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}
    size, n = 0, 0

    def flush() -> None:
        nonlocal shard, size, n
        n += 1
        save_file(shard, str(folder / f"model-{n:05d}.safetensors"), metadata={"format": "pt"})
        index.update({k: f"model-{n:05d}.safetensors" for k in shard})
        shard, size = {}, 0

    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        shard[key] = t
        size += t.numel() * 2
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return folder


def run_export(model: Path, out: Path, precision: str, validate: bool, extra: list[str], method: str = "rtn") -> dict:
    """`slm-export` in a child process: its exit code, wall time, peak RSS and each stage's peak so far."""
    cmd = [sys.executable, "-m", "slm_export.cli", "--target", "host", "--model", str(model), "--out", str(out),
           "--precision", precision, "--force"]
    if precision == "int4":
        cmd += ["--method", method]
    if not validate:
        cmd += ["--no-validate"]
    cmd += extra
    t0 = time.perf_counter()
    log = out.with_name(out.name + ".log")
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the maximum over all children
    proc.returncode = os.waitstatus_to_exitcode(status)
    report = out / "report.json"
    stages = json.loads(report.read_text()).get("stages", []) if report.is_file() else []
    return {"rc": proc.returncode, "s": time.perf_counter() - t0, "peak_rss_gb": usage.ru_maxrss / 2**20,
            "tail": log.read_text().strip().splitlines()[-12:],
            "stages": ", ".join(f"{x['name']} {x['peak_rss_mb'] / 1024:.1f}" for x in stages
                                if x.get("status") == "done")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/slm-scale"))
    ap.add_argument("--shapes", default="qwen2.5-1.5b")
    ap.add_argument("--precisions", default="fp32,int4")
    ap.add_argument("--no-validate", action="store_true")
    ap.add_argument("--extra", default="", help="more slm-export arguments, e.g. '--stream on'")
    ap.add_argument("--method", default="rtn", help="int4's method (gptq: add '--calib-samples 16 --calib-seqlen "
                    "256' to --extra to keep the run short)")
    args = ap.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        folder = write_shape(shape, args.work / shape)
        weights = sum(p.stat().st_size for p in folder.glob("*.safetensors")) * 2  # bf16 -> float32 bytes
        for precision in args.precisions.split(","):
            r = run_export(folder, args.work / f"{shape}-{precision}", precision, not args.no_validate,
                           args.extra.split(), args.method)
            print("\n".join(r["tail"]), file=sys.stderr)
            rows.append((shape, precision, r["rc"], f"{r['s']:.0f}", f"{r['peak_rss_gb']:.1f}",
                         f"{weights / 2**30:.1f}", f"{r['peak_rss_gb'] * 2**30 / weights:.2f}", r["stages"]))
    print(f"int4 method: {args.method}; extra arguments: {args.extra or '(none)'}")
    print("| shape | precision | exit | seconds | peak RSS GiB | fp32 weights GiB | peak / weights | peak so far after "
          "each stage, GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


if __name__ == "__main__":
    main()
