"""The CLI's information commands: targets, methods, backends, emulator status and device checks. Tables are boxed
on a terminal and plain tab-separated rows off one."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from slm_export.errors import ConfigError


def devices(args: argparse.Namespace) -> int:
    from slm_export.validation.ssh import SshDevice, check_device

    info = check_device(SshDevice(args.url, args.identity, args.known_hosts, command_timeout=60))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['device']}: reachable; {info.get('hostname')} {info.get('machine')}, {info.get('cpu', '?')}, "
          f"{info.get('cores')} cores, {info.get('memory_gb', '?')} GB memory, {info.get('free_disk_gb')} GB free")
    print(f"  python {info.get('python')}; " + ", ".join(f"{k} {v or 'not installed'}"
                                                         for k, v in info["runtimes"].items())
          + f"; trtexec {info.get('trtexec') or 'not found'}")
    return 0


METHOD_TABLE = (
    ("quantization", "rtn", "int8, int4", "round to nearest per group; no data"),
    ("quantization", "gptq", "int8, int4", "Hessian-guided rounding with error feedback; act-order, static groups"),
    ("quantization", "awq", "int8, int4", "activation-aware channel scales folded into the norm, then clip search"),
    ("quantization", "awq-gptq", "int8, int4", "AWQ's channel scales, then GPTQ rounding of the scaled weights "
     "(the int4 default)"),
    ("quantization", "smoothquant", "int8 (W8A8 static)", "outlier channels migrated into the weights (alpha "
     "searched or set), int8 weights per channel (fpga: per tensor, power of two), activations per tensor from "
     "an observer; down_proj's input smoothed, then rotated online by a block Hadamard (--rotate); "
     "explicit QuantizeLinear/DequantizeLinear"),
    ("quantization", "dynamic", "int8 (W8A8 dynamic)", "int8 weights per channel; activations quantized per "
     "token at run time; MatMulInteger; no data"),
    ("tuning", "end-to-end", "weight-only int8, int4 (--tune-epochs N)", "after quantization, norms and group "
     "scales fitted to the float model's next-token distributions (KL) on the calibration samples; codes fixed"),
    ("transform", "hadamard", "int8 W8A8 (--rotate N)", "down_proj input smoothed, then rotated online by a "
     "randomised block Hadamard (one MatMul); attention heads rotated offline through v_proj/o_proj"),
    ("observer", "minmax", "per-tensor, per-channel, per-group", "running min and max"),
    ("observer", "moving-average", "per-tensor, per-channel, per-group", "min and max averaged batch by batch"),
    ("observer", "percentile", "per-tensor", "99.99th percentile of |x| from a histogram"),
    ("observer", "entropy", "per-tensor", "threshold minimising KL(float || int8) of the histogram (TensorRT)"),
    ("observer", "mse", "per-tensor", "threshold minimising the expected squared quantization error"),
    ("granularity", "per-token", "dynamic", "computed at run time by the graph, not calibrated"),
    ("sparsity", "magnitude", "2:4, 4:8, unstructured", "smallest |W| removed; no data"),
    ("sparsity", "wanda", "2:4, 4:8, unstructured", "|W| x input activation norm, per output row"),
    ("sparsity", "sparsegpt", "2:4, 4:8, unstructured", "inverse-Hessian pruning with weight update"),
)


def _table(headers: tuple[str, ...], rows: Any, title: str | None = None) -> None:
    """A boxed table on a terminal; off one (a pipe, a file, CI), plain tab-separated rows that are never cut,
    so that `slm-export targets | grep android-arm64` finds its row."""
    if not sys.stdout.isatty():
        if title:
            print(f"# {title}")
        print("\t".join(headers))
        for row in rows:
            print("\t".join(str(c) for c in row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*headers, title=title)
    for row in rows:
        table.add_row(*(str(c) for c in row))
    Console(soft_wrap=True).print(table)


def methods() -> int:
    _table(("stage", "method", "applies to", "what it does"), METHOD_TABLE)
    print("Weight-only layers export as MatMulNBits (ONNX Runtime targets) or DequantizeLinear + MatMul (others);")
    print("W8A8 static as QuantizeLinear/DequantizeLinear pairs, W8A8 dynamic as MatMulInteger.")
    print("--max-ppl-increase P: int4 with the most sensitive projection groups kept at int8 until within P.")
    return 0


def emulator(args: argparse.Namespace) -> int:
    from slm_export.validation.emulator import default_env, setup

    env = default_env()
    if args.action == "setup":
        setup(env, progress=lambda msg: print(f"[emulator] {msg}", file=sys.stderr))
    problem = env.problem()
    if problem:
        print(f"emulator NOT usable here: {problem}; run `slm-export emulator setup`")
        return 3
    print(f"emulator usable here: qemu-aarch64-static, {env.root} ({', '.join(env.manifest['requirements'])})")
    return 0


def backends(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from slm_export.backends import availability
    from slm_export.targets import registry

    rows = availability()
    reg = registry()
    used_by = {r.backend: [t for t in reg.names() if r.backend in reg.get(t).backends] for r in rows}
    if args.json:
        print(json.dumps([{**asdict(r), "targets": used_by[r.backend]} for r in rows], indent=2))
        return 0
    for r in rows:
        state = "usable here" if r.usable else "NOT usable here"
        print(f"{r.backend:<12} {r.version or 'not installed':<14} {state:<16} targets: "
              f"{', '.join(used_by[r.backend]) or '-'}")
        print(f"    {r.reason}")
        if r.install and not r.usable:
            print(f"    install: {r.install}")
    return 0


def targets(args: argparse.Namespace) -> int:
    from slm_export.targets import get_target, registry

    reg = registry()
    if args.action == "show":
        if not args.name:
            raise ConfigError("usage: slm-export targets show NAME (see `slm-export targets`)")
        profile = get_target(args.name)
        data = profile.to_dict()
        if args.json:
            print(json.dumps(data, indent=2))
            return 0
        print(f"{profile.id}: {profile.name}\n{profile.description}\n")
        sources = data.pop("sources")
        _table(("field", "value"), _flatten(data), "profile")
        _table(("profile field", "source (and how sure)"), sources.items(), "sources")
        return 0
    rows = [reg.get(n) for n in reg.names()]
    if args.json:
        print(json.dumps([{"id": p.id, "aliases": list(p.aliases), "backends": list(p.backends),
                           "precisions": list(p.precisions), "default": p.default_precision} for p in rows]))
        return 0
    _table(("id", "aliases", "backends", "precisions (default)", "validation", "name"),
           [(p.id, ", ".join(p.aliases), ", ".join(p.backends), f"{', '.join(p.precisions)} ({p.default_precision})",
             p.validation, p.name) for p in rows])
    return 0


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in data.items():
        if isinstance(v, dict) and v and k not in ("peak_gflops", "refused_precisions"):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out
