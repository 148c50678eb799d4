"""The validation runs after the host's full one: every other runtime file of the artifact, on the host
(cross-checks), and the files the target itself loads, under the ARM emulator.

Both go through the runner (``slm_export/runner``) with a job of a few windows, and each result is
compared, on the same windows, with the PyTorch float32 reference and with the host run of the file
validation ran (cross-checks) or of the same file (emulation). Metrics are named by where they ran and
which backend's file ran: ``tvm_...`` (host cross-check), ``emulated_onnxruntime_...``, ``emulated_tvm_...``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from slm_export.errors import DeviceError
from slm_export.validation.remote import HostRunner, RemoteSettings, remote_validation

# Under QEMU each token costs about a hundred times the host's (every decoded token as much as a prompt
# token: a GEMV reads every weight); emulated speed is not device speed, so the greedy run's times stand
# for the timing (repeats=0) and the tokens go to accuracy. smollm2-135m int4 on rpi4b, 2 threads: the
# earlier 2 x 256 windows, 16 greedy, 2 x (64 + 16) timed tokens took 25 min for both files.
EMULATED_ORT = RemoteSettings(windows=1, window_len=256, greedy_tokens=8, prompt_tokens=32, repeats=0)
# A TVM library under QEMU runs its loops on an emulated core: a few tokens are what fits.
EMULATED_TVM = RemoteSettings(windows=1, window_len=128, greedy_tokens=8, prompt_tokens=32, repeats=0)


def crosscheck(model: Any, folder: Path, results: list[Any], validated: str, text: Any, settings: Any,
               progress: Any = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run each other backend's runtime file on the host against the validated file. ``settings`` (the
    host validation's) caps the windows and timed tokens: a cross-check measures no more than validation."""
    base = RemoteSettings()
    remote = replace(base, threads=settings.threads, windows=min(base.windows, settings.windows),
                     decode_tokens=min(base.decode_tokens, settings.decode_tokens))
    metrics: dict[str, Any] = {}
    details = []
    for r in results:
        if r.status != "done" or not r.runtime_model or r.runtime_model == validated:
            continue
        if progress:
            progress("crosscheck", f"{r.runtime_model} against {validated}")
        m, d = remote_validation(HostRunner(), folder, r.runtime_model, model.torch_module(), model.tokenizer, text,
                                 remote, r.backend, versus=validated,
                                 versus_label="validated")
        metrics.update(m)
        details.append({"backend": r.backend, "prefix": r.backend, "versus_label": "validated", **d})
    return metrics, details


def _emulator_can_run(file: str, backend: str, env: Any) -> str | None:
    """Why the emulator cannot run this file, or None."""
    have = " ".join(env.manifest.get("requirements", []))
    if file.endswith((".onnx", ".ort")):
        return None if "onnxruntime" in have else "no aarch64 onnxruntime in the emulator"
    if backend == "tvm" and file.endswith(".so"):
        return None if "apache-tvm" in have else "no aarch64 TVM runtime in the emulator"
    if file.endswith(".pte"):
        # With executorch 1.5.1 and torch 2.13.0, ExecuTorch's aarch64 wheel's runtime
        # (_C) links libtorch; the package registry's aarch64 torch is the CUDA build, whose libtorch_cpu
        # alone needs libcudart and libcupti (and libtorch_python cuDNN and NCCL): gigabytes of NVIDIA wheels.
        return ("ExecuTorch's aarch64 Python runtime links libtorch, and the only aarch64 torch in the package "
                "registry is the CUDA build (its libraries need NVIDIA's CUDA runtime, cuDNN and NCCL), which the "
                "emulator does not carry; the host ran the .pte with ExecuTorch's runtime instead")
    return f"the emulator has no runtime for {file}"


def emulate(model: Any, folder: Path, results: list[Any], profile: Any, text: Any, settings: Any, required: bool,
            progress: Any = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run each backend's device file under qemu-aarch64 with the profile's CPU model. When ``required``
    (``--emulate``) an emulator that cannot run is an error; otherwise (the profile's default) it is
    reported and the host's figures stand. ``settings`` (the host validation's): its threads, and its
    ``emulate_tokens`` as the accuracy window (``--emulate-tokens``; default EMULATED_ORT's or EMULATED_TVM's)."""
    from slm_export.validation.emulator import EmulatorRunner

    metrics: dict[str, Any] = {}
    details: list[dict[str, Any]] = []
    try:
        runner = EmulatorRunner(profile)
        problem = runner.env.problem()
        if problem:
            raise DeviceError(f"the ARM emulator cannot run: {problem}; run `slm-export emulator setup`")
    except DeviceError as exc:
        if required:
            raise
        return {}, [{"runner": "emulator", "status": "not run", "reason": str(exc)}]
    for r in results:
        file = r.device_model or r.runtime_model
        if r.status != "done" or not file:
            continue
        why = _emulator_can_run(file, r.backend, runner.env)
        if why:
            details.append({"runner": "emulator", "backend": r.backend, "file": file, "status": "not run",
                            "reason": why})
            continue
        if progress:
            progress("emulate", f"{file} on qemu-aarch64 -cpu {runner.cpu}")
        base = EMULATED_TVM if r.backend == "tvm" else EMULATED_ORT
        m, d = remote_validation(runner, folder, file, model.torch_module(), model.tokenizer, text,
                                 replace(base, threads=settings.threads,
                                         window_len=settings.emulate_tokens or base.window_len),
                                 f"emulated_{r.backend}",
                                 versus=r.runtime_model or file)
        metrics.update(m)
        details.append({"backend": r.backend, "prefix": f"emulated_{r.backend}", "versus_label": "host", **d})
    return metrics, details


def on_device(model: Any, folder: Path, results: list[Any], validated: str, text: Any, settings: Any,
              progress: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the file the device loads (the plan's backend's device file, else the validated one) on the
    device over SSH, with the host validation's window count, so its figures compare one to one."""
    from slm_export.validation.ssh import SshDevice, SshRunner

    device = SshDevice(settings.device, settings.identity, settings.known_hosts,
                       command_timeout=settings.device_timeout)
    runner = SshRunner(device)
    primary = results[0]
    file = primary.device_model if primary.status == "done" and primary.device_model else validated
    if progress:
        progress("device", f"{file} on {device.url}")
    remote = RemoteSettings(windows=settings.windows, window_len=settings.window_len,
                            greedy_tokens=settings.greedy_tokens, prompt_tokens=settings.prompt_tokens,
                            decode_tokens=settings.decode_tokens, repeats=settings.repeats, threads=settings.threads)
    m, d = remote_validation(runner, folder, file, model.torch_module(), model.tokenizer, text, remote, "device",
                             versus=validated)
    far_wall = d.pop("far_wall_s", None)
    d.update(runner.last)
    if far_wall is not None:
        d["overhead_s"] = round(d["wall_s"] - far_wall, 1)  # transfer, ssh and start-up beyond the run itself
    return m, {"backend": primary.backend, "prefix": "device", "versus_label": "host", **d}
