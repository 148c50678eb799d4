"""Backends: compile the exported graph into what the device's runtime loads.

One module a backend, each an object with the ``Backend`` protocol, registered by explicit import
below. A profile names its backends in order of preference; the plan's backend is the first.

- ``check()`` says whether the backend is usable on this machine (installed version, or why not and how
  to install it); ``slm-export backends`` prints it for every backend.
- ``compile(job)`` adds the backend's files to the artifact folder (being written) and returns what it
  did. A step that needs hardware this machine lacks (a TensorRT engine without an NVIDIA GPU) is
  reported as "not run", with the reason, and the files to run it where the hardware is.
- ``runtime_model`` in the result names the file the device loads when validation should run that
  file rather than the portable ``model.onnx`` (e.g. ONNX Runtime's ``.ort`` for phones and boards).
"""

from __future__ import annotations

from typing import Any

from slm_export.backends.base import Availability, Backend, CompileJob, CompileResult
from slm_export.registry import Registry

__all__ = ["BACKENDS", "EXACT_QDQ", "Availability", "Backend", "CompileJob", "CompileResult", "availability",
           "compile_all", "compile_artifact", "get_backend", "validated_file"]


BACKENDS: Registry[Backend] = Registry("backend")


def _register_builtins() -> None:
    from slm_export.backends.executorch import ExecuTorchBackend
    from slm_export.backends.llamacpp import LlamaCppBackend
    from slm_export.backends.onnxruntime import OnnxRuntimeBackend
    from slm_export.backends.tensorrt import TensorRTBackend
    from slm_export.backends.tvm import TvmBackend
    from slm_export.backends.vitis import VitisAIBackend

    for b in (OnnxRuntimeBackend(), TensorRTBackend(), VitisAIBackend(), ExecuTorchBackend(), TvmBackend(),
              LlamaCppBackend()):
        BACKENDS.register(b.name, b)


_register_builtins()


def get_backend(name: str) -> Backend:
    return BACKENDS.get(name)


def compile_artifact(job: CompileJob, name: str | None = None) -> CompileResult:
    """Run one backend's compile step (the plan's by default). Backends a profile names but this
    version does not implement (tvm) report "not run" with the portable graph as the artifact."""
    name = name or job.plan.backend
    if name not in BACKENDS:
        return CompileResult(name, "not run",
                             f"the {name} compile step is not part of this version; the artifact is the portable "
                             f"standard-ONNX graph that {name} takes as input")
    if name != job.plan.backend and job.model_kind == "decoder" and job.model is not None:
        why = _cannot_rebuild(job, name)
        if why:
            return CompileResult(name, "not run", f"{name} cannot build this model: {why}")
    return BACKENDS.get(name).compile(job)


def _cannot_rebuild(job: CompileJob, name: str) -> str | None:
    """What a secondary PyTorch-rebuilding backend (ExecuTorch, TVM) cannot build of this decoder, if anything."""
    from slm_export.preflight import rebuild_checks

    check = rebuild_checks().get(name)
    if check is None:
        return None
    from slm_export.models.adapters import spec_for

    weights = job.weights if job.weights is not None else job.model.weights
    return check(spec_for(job.model.config, weights), job.plan.max_seq_len)


# Backends that build their files from the model's weights (the compress stage's), not from the ONNX graph.
WEIGHT_READERS = ("executorch", "tvm", "llamacpp")


def reads_weights(plan: Any, profile: Any) -> bool:
    """Whether any backend of this run builds from the weights, so the compile stage still needs them."""
    return any(b in WEIGHT_READERS for b in (plan.backend, *profile.backends))


def compile_all(job: CompileJob) -> list[CompileResult]:
    """The plan's backend first, then the profile's other backends: the artifact carries each one's
    files (an Android folder holds the ExecuTorch program and the ORT-format model)."""
    names = [job.plan.backend, *(b for b in job.profile.backends if b != job.plan.backend)]
    return [compile_artifact(job, n) for n in names]


# Backends whose runtime is not ONNX Runtime: their Q/DQ pairs are validated as exact int8 products.
EXACT_QDQ = ("tensorrt", "vitis-ai")


def validated_file(results: list[CompileResult], portable: str) -> str:
    """The file validation runs: the plan's backend's own when it made one here; for GPU/DPU backends
    the portable graph (exact int8 arithmetic); otherwise the first runtime file another backend made."""
    first = results[0]
    if first.status == "done" and first.runtime_model:
        return first.runtime_model
    if first.backend in EXACT_QDQ:
        return portable
    for r in results[1:]:
        if r.status == "done" and r.runtime_model:
            return r.runtime_model
    return portable


def availability() -> list[Availability]:
    """Every registered backend's ``check()``, plus the profile backends not implemented yet."""
    from slm_export.targets.profile import KNOWN_BACKENDS

    rows = [BACKENDS.get(n).check() for n in BACKENDS.names()]
    for name in KNOWN_BACKENDS:
        if name not in BACKENDS:
            rows.append(Availability(name, False, None, "its compile step is not part of this version"))
    return rows
