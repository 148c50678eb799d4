"""Detect this machine: ISA, CPU model and features, cores, memory; bandwidth measured once and cached."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

from slm_export.targets.profile import CpuSpec, TargetProfile

# Flags that change which kernels run (Linux /proc/cpuinfo names); the rest is noise for this tool.
ML_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
            "avx_vnni", "neon", "asimd", "asimddp", "fphp", "asimdhp", "i8mm", "bf16", "sve", "sve2")
ISA_NAMES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64",
             "armv7l": "armv7", "armv8l": "armv7"}
CPUINFO, MEMINFO = Path("/proc/cpuinfo"), Path("/proc/meminfo")
MAX_FREQ = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
BUFFER_MB = 2048
BANDWIDTH_METHOD = "torch-f32-sum"  # in the cache key: a figure from an older method is measured again


def cache_dir() -> Path:
    """The folder for cached measurements.

    Returns:
        ``$SLM_EXPORT_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/slm-export`` (``~/.cache/slm-export``).
    """
    if os.environ.get("SLM_EXPORT_CACHE_DIR"):
        return Path(os.environ["SLM_EXPORT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slm-export"


def _read(path: Path) -> str | None:
    """A text file's contents, or None where it is missing or unreadable (containers, macOS)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _cpuinfo() -> tuple[str | None, list[str], float | None, str]:
    """CPU model, ML-relevant flags and clock (GHz) with the clock's source; None where unknown."""
    model: str | None = None
    flags: list[str] = []
    ghz: float | None = None
    freq_src = "unknown"
    text = _read(CPUINFO) or ""
    for line in text.splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        if key in ("model name", "Hardware") and not model:
            model = value or None
        elif key in ("flags", "Features") and not flags:
            flags = [f for f in value.split() if f in ML_FLAGS or f.startswith("amx")]
        elif key == "cpu MHz" and ghz is None:
            with contextlib.suppress(ValueError):
                ghz, freq_src = float(value) / 1000, "detected: /proc/cpuinfo cpu MHz (current clock)"
    max_khz = (_read(MAX_FREQ) or "").strip()
    if max_khz.isdigit() and int(max_khz) > 0:  # the maximum clock beats the momentary one
        ghz, freq_src = int(max_khz) / 1e6, f"detected: {MAX_FREQ}"
    return model or platform.processor() or None, flags, ghz, freq_src


def _memory_gb() -> float | None:
    """Physical memory in GB from /proc/meminfo, or None."""
    for line in (_read(MEMINFO) or "").splitlines():
        if line.startswith("MemTotal:") and line.split()[1].isdigit():
            return int(line.split()[1]) / 1024**2
    return None


def _buffer_mb(megabytes: int = BUFFER_MB) -> int:
    """The bandwidth buffer: ``megabytes``, at most an eighth of this machine's memory."""
    memory = _memory_gb()
    return max(16, min(megabytes, int(memory * 1024 / 8))) if memory else megabytes


def measure_bandwidth_gbs(threads: int, megabytes: int | None = None, repeats: int = 5) -> float:
    """Measure read bandwidth the way STREAM would: a float32 sum over a buffer far larger than the
    caches (2 GiB by default, at most an eighth of memory), with ``threads`` threads.

    torch's vectorised reduction keeps up with memory; numpy's float64 pairwise sum does not (it read
    12.9 GB/s on a box where this reads 25), which made every roofline half of what the memory allows.
    scripts/bench_decode.py uses this same function.

    Args:
        threads: Thread count (use the core count to saturate the memory system).
        megabytes: Buffer size.
        repeats: Timed passes after one that faults the pages in; the best one counts.

    Returns:
        Best observed bandwidth in GB/s (1e9 bytes per second).
    """
    import torch

    megabytes = megabytes or _buffer_mb()
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        buf = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
        buf.sum()  # fault the pages in
        best = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            buf.sum()
            best = max(best, buf.numel() * 4 / (time.perf_counter() - start) / 1e9)
    finally:
        torch.set_num_threads(before)
    return best


def _measure_apart(cores: int) -> float:
    """``measure_bandwidth_gbs`` in a child process: its buffer (up to 2 GiB) would otherwise stand as the run's
    peak memory, which the report states and the streaming load keeps small. In this process if the child fails."""
    import subprocess
    import sys

    code = f"from slm_export.targets.host import measure_bandwidth_gbs; print(measure_bandwidth_gbs({int(cores)}))"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
        return float(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return measure_bandwidth_gbs(cores)


def _cached_bandwidth(key: str, cores: int) -> tuple[float, str]:
    """Bandwidth for this CPU from the cache, measuring (and caching) it on a miss."""
    cache = cache_dir() / "host.json"
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        if data["key"] == key:
            return float(data["bandwidth_gbs"]), f"{data['source']} (cached in {cache})"
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache, another machine's, or a damaged file: measure again
    bandwidth = _measure_apart(cores)
    source = (f"measured: float32 read of a {_buffer_mb()} MB buffer with {cores} threads on "
              f"{time.strftime('%Y-%m-%d')}")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "bandwidth_gbs": bandwidth, "source": source}), encoding="utf-8")
    except OSError:
        pass  # an unwritable cache only costs a re-measurement next time
    return bandwidth, source


def _flop_per_cycle(isa: str, flags: list[str]) -> int:
    """fp32 FLOP per cycle per core, conservatively: one FMA pipe's worth on each vector width."""
    if isa == "x86_64":
        return 32 if "avx512f" in flags else 16 if {"avx2", "fma"} <= set(flags) else 8
    return 8  # a 128-bit NEON FMA per cycle (LLVM's Cortex-A57/A72 model)


def detect_host(profile: TargetProfile) -> TargetProfile:
    """Fill ``profile`` with this machine's facts, each with a source.

    Args:
        profile: The built-in ``host`` profile, whose placeholder figures are replaced.

    Returns:
        A copy with CPU, memory, measured bandwidth (cached per CPU model and core count) and peak
        compute estimates; a fact that cannot be read keeps a fallback and a source saying "unknown".
    """
    machine = platform.machine().lower()
    isa = ISA_NAMES.get(machine, profile.cpu.isa)
    model, flags, ghz, freq_src = _cpuinfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    memory = _memory_gb()
    bandwidth, bw_src = _cached_bandwidth(f"{model or machine}|{cores}|{BANDWIDTH_METHOD}", cores)
    clock = ghz or 2.0
    per_cycle = _flop_per_cycle(isa, flags)
    fp32 = cores * clock * per_cycle
    int_gain = 4 if {"avx512_vnni", "avx_vnni", "asimddp"} & set(flags) else 2 if isa == "x86_64" else 1
    fp16_gain = 2 if "asimdhp" in flags else 1
    sources = {
        "cpu.isa": "detected: platform.machine()" if machine in ISA_NAMES else f"unknown: {machine!r}",
        "cpu.model": "detected: /proc/cpuinfo" if model else "unknown: /proc/cpuinfo unreadable",
        "cpu.features": "detected: /proc/cpuinfo flags (ML-relevant ones)" if flags else "unknown: no flags read",
        "cpu.cores": "detected: os.sched_getaffinity (cores this process may use)",
        "cpu.freq_ghz": freq_src if ghz else "unknown: 2.0 GHz assumed",
        "memory.capacity_gb": "detected: /proc/meminfo MemTotal" if memory else "unknown: 1 GB assumed",
        "memory.bandwidth_gbs": bw_src,
        "compute.fp32": f"derived: cores x GHz x FLOP/cycle = {cores} x {clock:.2f} x {per_cycle}",
        "compute.fp16": f"derived: fp32 x {fp16_gain} (x2 only with fp16 vector arithmetic, asimdhp)",
        "compute.int8": f"derived: fp32 x {int_gain} (x4 with VNNI or SDOT dot products)",
        "compute.int4": "derived: same as int8 (int4 weights are unpacked onto the int8 path)",
    }
    cpu = CpuSpec(isa=isa, model=model or "unknown", cores=cores, freq_ghz=round(clock, 3), features=tuple(flags))
    return replace(profile, cpu=cpu, memory_gb=round(memory or 1.0, 1), bandwidth_gbs=round(bandwidth, 1),
                   peak_gflops={"fp32": fp32, "fp16": fp32 * fp16_gain, "int8": fp32 * int_gain,
                                "int4": fp32 * int_gain},
                   sources={**profile.sources, **sources})
