"""Detect this machine: ISA, CPU model and features, cores, memory; bandwidth measured once and cached."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from slm_export.targets.profile import CpuSpec, TargetProfile

ML_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
            "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "fphp", "asimdhp", "i8mm", "sve", "bf16")


def cache_dir() -> Path:
    """Where measurements are cached: $SLM_EXPORT_CACHE_DIR, else $XDG_CACHE_HOME/slm-export."""
    if os.environ.get("SLM_EXPORT_CACHE_DIR"):
        return Path(os.environ["SLM_EXPORT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slm-export"


def _cpuinfo() -> tuple[str, list[str], float]:
    model, flags, mhz = platform.processor() or "unknown", [], 0.0
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags, mhz
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("model name", "Hardware") and model in ("unknown", ""):
            model = value
        elif key in ("flags", "Features") and not flags:
            flags = [f for f in value.split() if f in ML_FLAGS]
        elif key == "cpu MHz" and not mhz:
            mhz = float(value)
    return model, flags, mhz


def _memory_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return 1.0


def measure_bandwidth_gbs(threads: int, megabytes: int = 256, repeats: int = 5) -> float:
    """Best-of-``repeats`` read bandwidth: ``threads`` workers sum disjoint slices of a large buffer."""
    import numpy as np

    buf = np.ones(megabytes * 2**20 // 8, dtype=np.float64)
    parts = np.array_split(buf, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))  # numpy releases the GIL inside the reduction
            best = max(best, buf.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def detect_host(profile: TargetProfile) -> TargetProfile:
    """``profile`` with this machine's facts filled in; bandwidth is cached per CPU model and cores."""
    isa = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(
        platform.machine().lower(), "x86_64")
    model, flags, mhz = _cpuinfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ghz = mhz / 1000 if mhz else 2.0
    key = f"{model}|{cores}"
    cache = cache_dir() / "host.json"
    cached = {}
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(cache.read_text())
    if cached.get("key") == key:
        bandwidth, when = float(cached["bandwidth_gbs"]), cached["measured"]
    else:
        bandwidth, when = measure_bandwidth_gbs(cores), time.strftime("%Y-%m-%d")
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"key": key, "bandwidth_gbs": bandwidth, "measured": when}))
        except OSError:
            pass  # an unwritable cache only costs a re-measurement next time
    per_cycle = 32 if "avx512f" in flags else 16 if "fma" in flags else 8
    fp32 = cores * ghz * per_cycle
    sources = {
        "cpu.model": "detected: /proc/cpuinfo" if model != "unknown" else "unknown: /proc/cpuinfo unreadable",
        "cpu.features": "detected: /proc/cpuinfo flags (ML-relevant ones)",
        "cpu.cores": "detected: sched_getaffinity",
        "cpu.freq_ghz": "detected: /proc/cpuinfo cpu MHz" if mhz else "unknown: 2.0 GHz assumed",
        "memory.capacity_gb": "detected: /proc/meminfo MemTotal",
        "memory.bandwidth_gbs": f"measured: numpy read of 256 MB with {cores} threads on {when} (cached in {cache})",
        "compute.fp32": f"derived: {cores} cores x {ghz:.2f} GHz x {per_cycle} FLOP/cycle",
        "compute.fp16": "derived: same as fp32 (no fp16 arithmetic in ONNX Runtime's x86 CPU kernels)",
        "compute.int8": "derived: fp32 x 4 with AVX-512 VNNI, x 2 otherwise",
        "compute.int4": "derived: int4 weights run on the int8 path (MatMulNBits accuracy level 4)",
    }
    cpu = CpuSpec(isa=isa, model=model, cores=cores, freq_ghz=ghz, features=tuple(flags))
    return replace(profile, cpu=cpu, memory_gb=round(_memory_gb(), 1), bandwidth_gbs=round(bandwidth, 1),
                   peak_gflops={"fp32": fp32, "int8": fp32 * (4 if "avx512_vnni" in flags else 2),
                                "int4": fp32 * (4 if "avx512_vnni" in flags else 2), "fp16": fp32},
                   sources={**profile.sources, **sources})
