"""The plan: every decision the run will act on, fixed before any work starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
# Precisions this version of the tool can produce; the others are refused with a clear message.
IMPLEMENTED_PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class Plan:
    """What a run will do. Built by ``pipeline.make_plan`` from the target profile and user options."""

    target: str
    model: str
    out: str
    precision: str
    backend: str
    graph_ops: str  # "standard" (portable ONNX) or "onnxruntime" (ORT contrib ops allowed)
    opset: int
    static_shapes: bool
    max_seq_len: int
    validation: str  # "host", "emulator" or "device"
    eval_data: str | None = None
    sparsity: str | None = None
    method: str | None = None
    validate: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for reports."""
        data = asdict(self)
        data["notes"] = list(self.notes)
        return data
