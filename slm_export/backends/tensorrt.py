"""TensorRT: an engine is specific to one GPU and one TensorRT version, so it is built where the GPU is.

Always written: ``trt_profile.json`` (the optimization profile: min/opt/max shape of every input, one
profile covering a 1-token decode step with no past up to a full window) and ``build_engine.sh``,
the exact ``trtexec`` command the plan implies: precision flags, ``--sparsity=enable`` for 2:4 weights
on sparse-capable GPUs, the workspace pool sized from the profile's memory, in the flag spelling of
the profile's TensorRT version (``--workspace`` before 8.4, ``--memPoolSize`` after).

When the ``tensorrt`` Python package and an NVIDIA GPU are both present, the engine is built here
through the Python API with the same settings (``model.engine``); otherwise the report says the engine
build was not run here, and why.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from slm_export.backends.base import Availability, CompileJob, CompileResult
from slm_export.errors import CompileError

INSTALL = "pip install tensorrt (needs an NVIDIA GPU and driver); on Jetson it comes with JetPack"


def _gpu() -> str | None:
    """The first NVIDIA GPU's name from nvidia-smi, or None."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _trt_version() -> str | None:
    try:
        import tensorrt  # type: ignore[import-not-found]
    except ImportError:
        return None
    return str(tensorrt.__version__)


def _legacy_workspace(versions: tuple[str, ...]) -> bool:
    """TensorRT before 8.4 spells the workspace pool ``--workspace=N`` (MiB)."""
    if not versions:
        return False
    major, minor = (int(p) if p.isdigit() else 0 for p in (versions[0].split(".") + ["0"])[:2])
    return (major, minor) < (8, 4)


def shape_profile(model_path: Path, max_len: int, opt_past: int | None = None) -> dict[str, dict[str, list[int]]]:
    """min/opt/max of each graph input. Symbolic dims: batch 1; seq 1..max; past 0..max-1; total
    (mask) 1..max. opt is the decode step (1 token) at half the window of past, where generation spends
    its time."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    half = opt_past if opt_past is not None else max_len // 2
    ranges = {"batch": (1, 1, 1), "seq": (1, 1, max_len), "past": (0, half, max_len - 1),
              "total": (1, half + 1, max_len)}
    out: dict[str, dict[str, list[int]]] = {}
    for inp in m.graph.input:
        dims = inp.type.tensor_type.shape.dim
        lo, opt, hi = [], [], []
        for d in dims:
            if d.HasField("dim_value"):
                lo.append(d.dim_value)
                opt.append(d.dim_value)
                hi.append(d.dim_value)
            else:
                # windowed layers name their own past length (past_3): it ranges like every past
                r = ranges.get("past" if d.dim_param.startswith("past") else d.dim_param, (1, 1, max_len))
                lo.append(r[0])
                opt.append(r[1])
                hi.append(r[2])
        out[inp.name] = {"min": lo, "opt": opt, "max": hi}
    return out


def _workspace_mib(target: Any) -> int:
    """The workspace pool: an eighth of the device's memory, at most 4 GiB."""
    return int(min(target.memory_gb * 1024 / 8, 4096))


def _builder_flags(job: CompileJob) -> list[str]:
    """TensorRT builder flags the plan implies (names of ``trt.BuilderFlag``; trtexec spells them below).
    int4 is weight-only, dequantized to fp16 GEMMs; int8 is explicit Q/DQ (scales from the graph, no
    calibrator); 2:4 sparse weights only where the GPU has sparse tensor cores."""
    flags = {"fp16": ["FP16"], "int4": ["FP16"], "bf16": ["BF16"], "int8": ["INT8"]}.get(job.plan.precision, [])
    if job.plan.sparsity == "2:4" and job.profile.sparse_speedup:
        flags.append("SPARSE_WEIGHTS")
    return flags


_TRTEXEC_FLAG = {"FP16": "--fp16", "BF16": "--bf16", "INT8": "--int8", "SPARSE_WEIGHTS": "--sparsity=enable"}


def _shapes_arg(profile: dict[str, dict[str, list[int]]], which: str) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, s[which]))}" for name, s in profile.items())


def trtexec_args(job: CompileJob, profile: dict[str, dict[str, list[int]]], engine: str) -> list[str]:
    """The trtexec command line for this plan and target."""
    target = job.profile
    versions = target.gpu.tensorrt if target.gpu else ()
    workspace_mib = _workspace_mib(target)
    args = ["trtexec", f"--onnx={job.model_path.name}", f"--saveEngine={engine}"]
    for which, flag in (("min", "--minShapes"), ("opt", "--optShapes"), ("max", "--maxShapes")):
        args.append(f"{flag}={_shapes_arg(profile, which)}")
    args += [_TRTEXEC_FLAG[f] for f in _builder_flags(job)]
    args.append(f"--workspace={workspace_mib}" if _legacy_workspace(versions)
                else f"--memPoolSize=workspace:{workspace_mib}")
    return args


def _script(job: CompileJob, args: list[str]) -> str:
    versions = job.profile.gpu.tensorrt if job.profile.gpu else ()
    return "\n".join([
        "#!/bin/sh",
        f"# Build the TensorRT engine for {job.profile.name} on the device itself (engines are specific to",
        f"# the GPU and the TensorRT version; this profile expects TensorRT {' or '.join(versions) or 'any'}).",
        "# Run it in the artifact folder; it writes model.engine beside model.onnx.",
        "set -eu",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
        '"$TRTEXEC" ' + " ".join(shlex.quote(a) for a in args[1:]) + ' "$@"',
        "",
    ])


class TensorRTBackend:
    name = "tensorrt"

    def check(self) -> Availability:
        version, gpu = _trt_version(), _gpu()
        if version and gpu:
            return Availability(self.name, True, version, f"builds engines here on {gpu}")
        why = []
        if not version:
            why.append("the tensorrt Python package is not installed")
        if not gpu:
            why.append("no NVIDIA GPU (nvidia-smi) on this machine")
        return Availability(self.name, False, version,
                            "; ".join(why) + ": writes build_engine.sh and the shape profile, builds no engine",
                            INSTALL)

    def compile(self, job: CompileJob) -> CompileResult:
        folder = job.model_path.parent
        profile = shape_profile(job.model_path, job.plan.max_seq_len)
        (folder / "trt_profile.json").write_text(json.dumps(profile, indent=1) + "\n")
        args = trtexec_args(job, profile, "model.engine")
        script = folder / "build_engine.sh"
        script.write_text(_script(job, args))
        script.chmod(0o755)
        files = ("trt_profile.json", "build_engine.sh")
        details: dict[str, Any] = {"trtexec": " ".join(shlex.quote(a) for a in args)}
        avail = self.check()
        if not avail.usable:
            return CompileResult(self.name, "not run",
                                 f"engine build not run here: {avail.reason.split(':')[0]}; run build_engine.sh "
                                 "on the device", files, details=details)
        seconds = _build_engine(job, profile, folder / "model.engine")
        details["engine_build_s"] = round(seconds, 1)
        return CompileResult(self.name, "done", f"engine built here with TensorRT {avail.version} on {_gpu()}",
                             (*files, "model.engine"), details=details)


def _build_engine(job: CompileJob, profile: dict[str, dict[str, list[int]]], out: Path) -> float:
    """Build and serialize the engine through the Python API with trtexec's settings."""
    import time

    import tensorrt as trt  # type: ignore[import-not-found]

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT < 10 needs it said
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(job.model_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CompileError(f"TensorRT's ONNX parser refused the graph: {errors}")
    config = builder.create_builder_config()
    for flag in _builder_flags(job):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, _workspace_mib(job.profile) << 20)
    opt = builder.create_optimization_profile()
    for name, s in profile.items():
        opt.set_shape(name, s["min"], s["opt"], s["max"])
    config.add_optimization_profile(opt)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise CompileError("TensorRT could not build an engine for this graph (see its log above)")
    out.write_bytes(bytes(engine))
    return time.perf_counter() - t0
