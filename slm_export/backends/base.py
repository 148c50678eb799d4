"""What every backend module shares: the compile job, its result, availability, and the ``Backend``
protocol (``backends/__init__.py`` describes them and registers the backends)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here."""

    backend: str
    usable: bool
    version: str | None  # installed version of its Python package or tool, None when absent
    reason: str  # what it does here, or why it cannot
    install: str = ""  # how to get it, when missing


@dataclass(frozen=True)
class CompileJob:
    """What the compile stage gets: the plan, the target, and the exported graph in its folder."""

    plan: Any  # slm_export.plan.Plan
    profile: Any  # slm_export.targets.TargetProfile
    model_path: Path  # the exported model.onnx (inside the artifact folder being written)
    model_kind: str = "decoder"  # or "encoder"
    config: dict[str, Any] = field(default_factory=dict)  # the model's architecture numbers
    # Backends that compile from PyTorch rather than from the ONNX graph (ExecuTorch) read these:
    model: Any = None  # slm_export.models.LoadedModel
    weights: Any = None  # the compress stage's weights (quantized tensors included), None: the model's own


@dataclass(frozen=True)
class CompileResult:
    backend: str
    status: str  # "done" or "not run"
    note: str
    files: tuple[str, ...] = ()  # files the step added to the artifact folder
    runtime_model: str | None = None  # file validation should run instead of model.onnx
    device_model: str | None = None  # the file the target itself loads, when it differs (an aarch64 library)
    details: dict[str, Any] = field(default_factory=dict)  # backend-specific, copied into the report


class Backend(Protocol):
    name: str

    def check(self) -> Availability: ...

    def compile(self, job: CompileJob) -> CompileResult: ...
