"""Backends: compile the exported graph for the runtime that loads it on the device.

This version compiles for ONNX Runtime only (the artifact is checked by loading it); the other
backends named by profiles report honestly that their compile step did not run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from slm_export.errors import CompileError, DeviceError


@dataclass(frozen=True)
class CompileResult:
    backend: str
    status: str  # "done" or "not run"
    note: str


def compile_artifact(backend: str, model_path: Path) -> CompileResult:
    """Run the backend's compile step on ``model_path`` (inside the temp artifact folder)."""
    if backend == "onnxruntime":
        try:
            import onnxruntime as ort
        except ImportError:
            raise DeviceError("onnxruntime is not installed; install it with: pip install onnxruntime") from None
        try:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise CompileError(f"ONNX Runtime cannot load the exported graph: {exc}") from None
        return CompileResult(backend, "done", f"graph loads in onnxruntime {ort.__version__} (CPU)")
    return CompileResult(backend, "not run",
                         f"the {backend} compile step is not part of this version; the artifact is the portable "
                         f"standard-ONNX graph that {backend} takes as input")
