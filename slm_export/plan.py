"""The plan: every decision the run will act on, fixed before any work starts (``planning.make_plan``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from slm_export.calibration.config import PRECISIONS, CompressConfig
from slm_export.options import opt

# Precisions this version of the tool can produce; the others are refused with a clear message.
IMPLEMENTED_PRECISIONS = PRECISIONS
QUANTIZED = ("int8", "int4")


@dataclass(frozen=True, kw_only=True)
class Plan(CompressConfig):
    """What a run will do: the target's facts, the user's choices and the profile's defaults. The compress stage's
    options are inherited from ``CompressConfig`` (declared there once), so the plan is the compress stage's
    config as it is."""

    target: str
    model: str
    out: str
    backend: str
    graph_ops: str  # "standard" (portable ONNX) or "onnxruntime" (ORT contrib ops allowed)
    opset: int
    static_shapes: bool
    max_seq_len: int
    validation: str  # "host", "emulator" or "device"
    eval_data: str | None = opt(None, "evaluation text (.txt, or .jsonl with a \"text\" field)")
    validate: bool = True
    stream: str = opt("auto", "read the weights from the model's files block by block when they are used instead of "
                      "holding them (safetensors models): on, off, or auto (when their float32 size exceeds an eighth "
                      "of this machine's memory). Same artifact either way; less memory, more reading",
                      choices=("auto", "on", "off"))
    emulate: str = "off"  # run the artifact's aarch64 runtime under QEMU too: "on", "auto" (if set up), "off"
    force: bool = opt(False, "replace an --out folder that holds other files (never the current or home folder, nor "
                      "one holding the run's inputs)", switch=True)
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for reports: one flat object, as ``from_dict`` reads it back."""
        data = asdict(self)
        data["notes"] = list(self.notes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """A plan from a report (older reports lack newer fields: their defaults apply)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["notes"] = tuple(values.get("notes", ()))
        return cls(**values)
