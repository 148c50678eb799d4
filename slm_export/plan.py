"""The plan: every decision the run will act on, fixed before any work starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
# Precisions this version of the tool can produce; the others are refused with a clear message.
IMPLEMENTED_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
QUANTIZED = ("int8", "int4")


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
    group_size: int = 32
    accuracy_level: int = 4
    symmetric: bool = False
    signed_scales: bool = False  # symmetric int4: negative scales where the positive end is the longer one
    calib_data: str | None = None
    calib_samples: int = 64
    calib_seqlen: int = 512
    seed: int = 0
    lm_head_bits: int = 0
    lm_head_hot: float = 0.0  # int4 head: fraction of its rows also kept at int8 (the calibration's most read)
    max_ppl_increase: float | None = None
    observer: str = "minmax"
    smooth_alpha: float | None = None
    pow2_scales: bool = False
    rotate: int = 0  # W8A8: block of the online Hadamard rotation of down_proj's input (0: none)
    tune_epochs: int = 0  # end-to-end tuning of norms and group scales after quantization (0: none)
    # SparseGPT: smollm2-135m 2:4 float32 +127% perplexity against Wanda's +470%, for 64 s of calibration
    # against 39 s (bench_compress, README); unstructured 50% +48% against +96%.
    sparsity_method: str = "sparsegpt"
    sparsity_ratio: float = 0.5
    validate: bool = True
    force: bool = False  # replace an --out folder that is not an artifact of this tool (never a user's cwd or home)
    emulate: str = "off"  # run the artifact's aarch64 runtime under QEMU too: "on", "auto" (if set up), "off"
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for reports."""
        data = asdict(self)
        data["notes"] = list(self.notes)
        return data
