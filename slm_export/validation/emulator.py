"""ARM emulation: run a target's own aarch64 runtime under ``qemu-aarch64-static`` with its CPU model.

The environment is built once and cached (``SLM_EXPORT_CACHE``, default ``~/.cache/slm-export``):

- ``sysroot/``: a Debian arm64 root with python3 and libstdc++, only unpacked (mmdebstrap's
  ``extract`` variant: no maintainer scripts, so no binfmt_misc or chroot is needed), from the apt
  sources this host already uses;
- ``site/``: the aarch64 wheels of numpy and of each runtime, at the host's versions, installed by the
  host's pip for the aarch64 platform (nothing runs pip under emulation);
- a ``/proc/cpuinfo`` for each profile: QEMU's user mode passes the host's file through, and ONNX
  Runtime's CPU detection crashes on an x86 one; the runner sees the target's instead (bind-mounted in
  a private mount namespace).

QEMU's ``-cpu`` model (the profile's ``qemu_cpu``, e.g. cortex-a72 for the Pi 4: NEON, no dot product)
makes an instruction the target lacks fault as it would on the device, so the emulator checks the ISA
as well as the arithmetic. Its timings say nothing about the device's speed and are labelled emulated.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slm_export.errors import DeviceError

SUITE = "bookworm"  # Debian 12: python3.11, the host's Python minor version (wheels are cp311)
HOST_TOOLS = {"qemu-aarch64-static": "qemu-user-static", "mmdebstrap": "mmdebstrap"}
# MIDR part numbers of the CPU models QEMU emulates, for the faked /proc/cpuinfo.
CPU_PARTS = {"cortex-a53": "0xd03", "cortex-a55": "0xd05", "cortex-a57": "0xd07", "cortex-a72": "0xd08",
             "cortex-a76": "0xd0b", "neoverse-n1": "0xd0c", "cortex-a710": "0xd47", "max": "0xd0c"}
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_24_aarch64",
             "manylinux_2_17_aarch64", "manylinux2014_aarch64", "linux_aarch64")


def cache_root() -> Path:
    return Path(os.environ.get("SLM_EXPORT_CACHE") or Path.home() / ".cache" / "slm-export")


@dataclass(frozen=True)
class EmulatorEnv:
    """The cached aarch64 environment: its folders and what is installed there."""

    root: Path

    @property
    def sysroot(self) -> Path:
        return self.root / "sysroot"

    @property
    def site(self) -> Path:
        return self.root / "site"

    @property
    def python(self) -> Path:
        return self.sysroot / "usr" / "bin" / "python3.11"

    @property
    def manifest(self) -> dict[str, Any]:
        path = self.root / "ready.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def problem(self) -> str | None:
        """Why the emulator cannot run here, or None."""
        if sys.platform != "linux":
            return "ARM emulation needs Linux (qemu-user)"
        missing = [pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None]
        if missing:
            return f"missing host tools (Debian packages: {', '.join(missing)})"
        if not self.manifest or not self.python.is_file():
            return f"the aarch64 environment is not set up in {self.root}"
        return None


def default_env() -> EmulatorEnv:
    return EmulatorEnv(cache_root() / "aarch64-py311")


def _runtime_requirements() -> list[str]:
    """The host's runtimes, pinned, so both sides run the same version of the artifact's runtime."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("numpy", "onnxruntime", "apache-tvm"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return reqs


def _apt_sources() -> Path | None:
    for path in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if path.is_file():
            return path
    found = sorted(Path("/etc/apt/sources.list.d").glob("*.sources")) if Path("/etc/apt/sources.list.d").is_dir() \
        else []
    return found[0] if found else None


def _run(cmd: list[str], what: str, timeout: float = 1800) -> None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"emulator setup: {what} timed out after {timeout:.0f} s") from None
    if res.returncode:
        raise DeviceError(f"emulator setup: {what} failed (exit {res.returncode}): {res.stderr.strip()[-1500:]}")


def setup(env: EmulatorEnv | None = None, progress: Any = None) -> EmulatorEnv:
    """Build (or reuse) the aarch64 environment; idempotent. Installs the host tools with apt when root."""
    env = env or default_env()
    say = progress or (lambda msg: None)
    missing = [pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None]
    if missing:
        if os.geteuid() != 0:
            raise DeviceError(f"ARM emulation needs the Debian packages {' '.join(missing)}: "
                              f"sudo apt-get install {' '.join(missing)}")
        say(f"installing {' '.join(missing)}")
        _run(["apt-get", "update", "-qq"], "apt-get update")
        _run(["apt-get", "install", "-y", "-qq", *missing], "apt-get install")
    reqs = _runtime_requirements()
    if env.manifest.get("requirements") == reqs and env.python.is_file():
        return env
    env.root.mkdir(parents=True, exist_ok=True)
    if not env.python.is_file():
        sources = _apt_sources()
        if sources is None:
            raise DeviceError("emulator setup: no apt sources on this host to fetch the arm64 packages from")
        say("unpacking a Debian arm64 root (python3, libstdc++)")
        tmp = env.root / "sysroot.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        _run(["mmdebstrap", "--quiet", "--variant=extract", "--architectures=arm64",
              "--include=python3,libstdc++6", SUITE, str(tmp), str(sources)], "mmdebstrap")
        shutil.rmtree(env.sysroot, ignore_errors=True)
        tmp.rename(env.sysroot)
    say(f"installing aarch64 wheels: {' '.join(reqs)}")
    tmp_site = env.root / "site.partial"
    shutil.rmtree(tmp_site, ignore_errors=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-warn-conflicts", "--disable-pip-version-check",
          "--target", str(tmp_site), "--only-binary=:all:", *platforms, "--python-version", "3.11",
          "--implementation", "cp", "--abi", "cp311", "--abi", "abi3", "--abi", "none", *reqs], "pip (aarch64 wheels)")
    # The far side only loads compiled modules: TVM's runtime library suffices (and starts in a third of
    # the time under QEMU), so its 230 MB compiler library is left out.
    (tmp_site / "tvm" / "lib" / "libtvm_compiler.so").unlink(missing_ok=True)
    shutil.rmtree(env.site, ignore_errors=True)
    tmp_site.rename(env.site)
    (env.root / "ready.json").write_text(json.dumps({"requirements": reqs, "suite": SUITE}, indent=1))
    return env


def fake_cpuinfo(profile: Any) -> str:
    """A /proc/cpuinfo for the profile's cores: its feature list and the QEMU CPU model's part number."""
    part = CPU_PARTS.get(profile.cpu.qemu_cpu or "", "0xd08")
    features = " ".join(profile.cpu.features) or "fp asimd"
    block = ("processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: " + features + "\nCPU implementer\t: 0x41\n"
             "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: " + part + "\nCPU revision\t: 0\n")
    return "\n".join(block.format(i=i) for i in range(max(1, profile.cpu.cores))) + f"\nModel\t\t: {profile.name}\n"


class EmulatorRunner:
    """Runs a validation job on an artifact under qemu-aarch64 with the profile's CPU model."""

    name = "emulator"

    def __init__(self, profile: Any, env: EmulatorEnv | None = None, timeout_s: float = 3600) -> None:
        if profile.cpu.isa != "aarch64":
            raise DeviceError(f"{profile.id} is {profile.cpu.isa}; the emulator runs aarch64 targets")
        if not profile.cpu.qemu_cpu:
            raise DeviceError(f"{profile.id} names no QEMU CPU model (cpu.qemu_cpu)")
        self.profile = profile
        self.cpu: str = profile.cpu.qemu_cpu
        self.env = env or default_env()
        self.timeout_s = timeout_s

    def where(self, result: dict[str, Any], file: str) -> str:
        e = result.get("environment", {})
        return (f"measured under emulation (qemu-aarch64 -cpu {self.cpu}, {e.get('runtime')} "
                f"{e.get('runtime_version')} {e.get('machine')}, {file}); emulated, not device speed")

    def run(self, artifact: Path, job: dict[str, Any]) -> dict[str, Any]:
        """Copy the runner beside a job file in a scratch folder, run it under QEMU, read the result."""
        problem = self.env.problem()
        if problem:
            raise DeviceError(f"the ARM emulator cannot run: {problem}; run `slm-export emulator setup`")
        with tempfile.TemporaryDirectory(prefix="slm-emu-") as tmp:
            work = Path(tmp)
            shutil.copytree(Path(__file__).resolve().parents[1] / "runner", work / "slm_runner",
                            ignore=shutil.ignore_patterns("__pycache__"))
            (work / "cpuinfo").write_text(fake_cpuinfo(self.profile))
            (work / "job.json").write_text(json.dumps({**job, "model": str((artifact / job["model"]).resolve())}))
            q = shlex.quote  # paths come from the environment (SLM_EXPORT_CACHE): never unquoted in a shell
            inner = (f'mount --bind {q(str(work / "cpuinfo"))} /proc/cpuinfo && exec qemu-aarch64-static '
                     f'-cpu {q(self.cpu)} -L {q(str(self.env.sysroot))} {q(str(self.env.python))} -m slm_runner '
                     f'{q(str(work / "job.json"))} {q(str(work / "result.json"))}')
            unshare = ["unshare", "-m", "--propagation", "private"] if os.geteuid() == 0 else \
                ["unshare", "-r", "-m", "--propagation", "private"]
            envvars = {**os.environ, "PYTHONPATH": f"{work}:{self.env.site}", "PYTHONDONTWRITEBYTECODE": "1",
                       "TVM_USE_RUNTIME_LIB": "1"}
            try:
                res = subprocess.run([*unshare, "sh", "-c", inner], cwd=work, env=envvars, capture_output=True,
                                     text=True, timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                raise DeviceError(f"the emulated run timed out after {self.timeout_s:.0f} s") from None
            result_path = work / "result.json"
            result = json.loads(result_path.read_text()) if result_path.is_file() else None
            if res.returncode or not result or not result.get("ok"):
                detail = (result or {}).get("error") or res.stderr.strip()[-1500:] or f"exit {res.returncode}"
                if res.returncode in (132, -4):
                    detail = (f"illegal instruction: the artifact's code uses an instruction {self.cpu} "
                              f"does not have ({detail})")
                raise DeviceError(f"the emulated run on {self.cpu} failed: {detail}")
            return result
