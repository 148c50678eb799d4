"""The run's peak memory, predicted from the model's shapes and the plan before any work is done.

``--dry-run`` prints the prediction stage by stage, and a plan predicted to exceed this machine's memory (or its
container's limit) is refused before the load, with the numbers. The report puts the prediction beside the peak
that was measured (docs/benchmarks/scale.md compares them).

Each stage's peak is what it holds at its worst moment:

- held runs keep every float32 weight from load to the end; streamed ones (``models/lazy.py``) hold one block;
- compress holds its results (codes, scales, zero points; int4 two codes a byte when streamed) and, at its worst,
  one layer's float weights with the calibration activations and Hessians, or the float LM head at the end;
- export holds the results and the largest tensor being written;
- compile runs ONNX Runtime's optimization without prepacking, over the graph's mapped weights;
- validation holds ONNX Runtime's session (its prepacked weights) and the windows' logits; a held reference sits
  beside the session, a streamed one runs before and after it, never beside it (``validation/validate.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slm_export.models.traits import traits_for

MIB = 1 << 20
# The interpreter with torch, ONNX Runtime, transformers and onnx imported, the tokenizer and the module skeleton,
# plus the allocators' slack (measured: 0.42 to 0.63 GiB after a streamed load).
BASELINE = 500 * MIB
# ONNX Runtime's CPU session, per byte of the graph's weights: float32 MatMul weights prepacked into padded panels
# (1.06 measured), MatMulNBits' int4 blocks repacked for int8 compute with per-block sums, and the embedding
# table's mapped pages (1.24 measured on an 8B-shaped int4 graph).
SESSION_FLOAT = 1.06
SESSION_QUANTIZED = 1.24
# Tensors this large are rounded, measured and written by blocks of rows (``calibration.quant.CHUNK_ELEMS``).
CHUNK = 1 << 24


@dataclass(frozen=True)
class Shapes:
    """What the prediction reads from a model: element counts by role."""

    weights: int  # every float32 weight, tied ones once
    linears: int  # the decoder layers' 2-D weights
    layer: int  # the largest decoder layer's weights
    largest: int  # the largest tensor
    hidden: int
    inner: int  # the MLP's inner width
    vocab: int
    head: int  # the LM head's elements (the embedding's when tied)
    max_in: int  # the widest input of a linear (its Hessian is max_in ** 2)
    tied: bool  # the head is the embedding's table (a quantized head is then a second tensor)


def model_shapes(model: Any) -> Shapes:
    shapes = model.shapes()
    if model.kind == "decoder":
        traits = traits_for(model.model_type, model.config)
        prefix, embed_name, head_name = traits.layers + ".", traits.embed, traits.lm_head
    else:  # an encoder: its layers are the numbered blocks wherever they sit; no head to quantize
        prefix, embed_name, head_name = "", "", ""
    layers: dict[str, int] = {}
    linears = max_in = 0
    for name, shape in shapes.items():
        n = _numel(shape)
        index = _layer_index(name, prefix)
        if index is not None:
            layers[index] = layers.get(index, 0) + n
            if len(shape) == 2:
                linears += n
                max_in = max(max_in, shape[1])
    cfg = model.config
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or getattr(cfg, "dim", 0) or 0)
    embed = _numel(shapes.get(embed_name, (0,)))
    return Shapes(model.weight_bytes // 4, linears, max(layers.values(), default=0),
                  max((_numel(s) for s in shapes.values()), default=0), hidden,
                  int(getattr(cfg, "intermediate_size", 0) or 4 * hidden), int(getattr(cfg, "vocab_size", 0) or 0),
                  _numel(shapes.get(head_name, (0,))) or embed, max_in, head_name not in shapes)


def _layer_index(name: str, prefix: str) -> str | None:
    """The decoder layer a weight belongs to (under ``prefix``); an encoder's: the first number in its name."""
    if prefix:
        return name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else None
    return next((part for part in name.split(".") if part.isdigit()), None)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def stored_bytes(plan: Any, streamed: bool) -> float:
    """Bytes a quantized weight is held in by the compress stage, per weight."""
    bits = {"int4": 4, "int3": 3, "int8": 8}.get(plan.precision)
    if bits is None:
        return 4.0
    group = plan.group_size if bits < 8 or plan.method in (None, "rtn", "gptq", "awq", "awq-gptq") else 1 << 30
    per_code = 0.5 if streamed and bits <= 4 else 1.0
    return per_code + 4.0 / group + (0.0 if plan.symmetric else 1.0 / group)


@dataclass(frozen=True)
class Prediction:
    stages: dict[str, int]  # bytes at each stage's worst moment
    streamed: bool

    @property
    def peak(self) -> int:
        return max(self.stages.values())

    def to_dict(self) -> dict[str, Any]:
        return {"peak_mb": round(self.peak / MIB), "streamed": self.streamed,
                "stages_mb": {k: round(v / MIB) for k, v in self.stages.items()}}


def predict(model: Any, plan: Any, settings: Any) -> Prediction:
    """The peak resident memory of ``plan`` over ``model`` (loaded or streamed as the run will have it)."""
    s = model_shapes(model)
    streamed = bool(model.streamed)
    held = 0 if streamed else s.weights * 4
    quantized = plan.precision in ("int4", "int3", "int8")
    results = 0.0
    if quantized:
        results = s.linears * stored_bytes(plan, streamed)
        if plan.lm_head_bits:
            results += s.head * (0.5 + 4.0 / plan.group_size if streamed else 1 + 4.0 / plan.group_size)
    stages = {"load": BASELINE + held + s.largest * 6}  # the finiteness check reads the largest tensor in float
    if quantized or plan.sparsity:
        stages["compress"] = BASELINE + held + int(results) + _compress_work(s, plan)
    written = min(s.largest, CHUNK) * 4 * 2
    stages["export"] = BASELINE + held + int(results) + written
    own_head = quantized and plan.lm_head_bits and not s.tied  # its float table is then not in the graph
    floats = s.weights - s.linears - (s.head if own_head else 0)  # embeddings, norms (and a float head)
    graph = int(results) + floats * 4 if quantized else s.weights * 4
    stages["compile"] = BASELINE + held + min(s.largest * 4, graph)
    if plan.validate:
        stages["validate"] = BASELINE + held + _validate_work(s, settings, graph, quantized, streamed)
    return Prediction(stages, streamed)


def _compress_work(s: Shapes, plan: Any) -> int:
    """The compress stage's largest transient beside its results."""
    rounding = min(s.largest, CHUNK) * 4 * 3 + s.largest * 4 * 2  # read in float, rounded by blocks, joined
    if plan.method in (None, "rtn") and not plan.sparsity:
        return rounding
    tokens = plan.calib_samples * plan.calib_seqlen
    activations = tokens * (s.hidden * 3 + s.inner * 2) * 4 + 8 * plan.calib_seqlen * s.inner * 4 * 3
    hessians = s.max_in ** 2 * 4 * 3  # a layer's widest input: its Hessian, its inverse and the solver's copy
    layer = s.layer * 4 + activations + hessians + min(s.largest, CHUNK) * 4 * 3
    head = s.head * 4 + 512 * s.vocab * 4 * 2 + min(s.head, CHUNK) * 4 * 3
    return max(layer, head, rounding)


def _validate_work(s: Shapes, settings: Any, graph: int, quantized: bool, streamed: bool) -> int:
    """Validation's worst moment: the session and the logits, and (held) the reference; a streamed reference's
    block, head and logits alone (it never runs beside the session)."""
    logits = settings.window_len * s.vocab * 4
    session = int(graph * (SESSION_QUANTIZED if quantized else SESSION_FLOAT)) + logits * 3
    if not streamed:
        return session + logits
    reference = s.layer * 4 + s.head * 4 + logits * 3
    return max(session, reference)


def check_fits(prediction: Prediction, total: int) -> str | None:
    """Why the plan cannot run on a machine with ``total`` bytes, or None when it fits."""
    if prediction.peak <= total:
        return None
    worst = max(prediction.stages, key=prediction.stages.__getitem__)
    hint = "" if prediction.streamed else " (held in memory: --stream on reads a safetensors model layer by layer)"
    return (f"predicted peak memory {prediction.peak / (1 << 30):.1f} GiB ({worst} stage) exceeds this machine's "
            f"{total / (1 << 30):.1f} GiB{hint}")
