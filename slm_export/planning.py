"""The plan: every decision a run acts on, made before any work from the target profile and the user's options.

``make_plan`` takes the options the user gave, checks each against its declaration (``options.py``), then lets
small rules fill what the user left open. A rule reads the profile and the decisions so far and returns the
decisions it adds with the note that explains them, or refuses with a ``ConfigError``; each rule's reasons and
the measurements behind its defaults are in docs/compression.md and docs/benchmarks/.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from slm_export import output
from slm_export.calibration.config import W8A8_METHODS, CompressConfig
from slm_export.errors import ConfigError, UnsupportedByTarget
from slm_export.models.hub import parse_hub_id
from slm_export.models.loader import ENCODER_TYPES, peek_model_type
from slm_export.options import check_values, given, unread
from slm_export.plan import IMPLEMENTED_PRECISIONS, QUANTIZED, Plan
from slm_export.targets import TargetProfile

DEFAULT_METHOD = {"int4": "awq-gptq", "int8": "rtn"}
# Backends whose int4 kernels multiply by the scale as stored, so a group's scale may be negative (llama.cpp's Q4_0
# block dequantizes as d * (q - 8) with a signed fp16 d: its own quantizer writes d = max / -8).
SIGNED_SCALE_BACKENDS = ("onnxruntime", "tvm", "llamacpp")
HOT_ROWS = 0.15  # int4 LM head: the fraction of its rows kept at int8 by default (ONNX-Runtime-only targets)
ROTATE_BLOCK = 128  # W8A8 static's default down_proj rotation block
IGNORED = "ignored: "  # the prefix of a note about an option the plan does not read; the CLI prints it as a warning


@dataclass
class Draft:
    """The decisions so far: what the user gave, then what the rules added."""

    profile: TargetProfile
    precision: str | None
    values: dict[str, Any]
    user: set[str]
    notes: list[str] = field(default_factory=list)
    model_type: str | None = None  # from the model's config when it can be read before loading

    def has(self, name: str) -> bool:
        return self.values.get(name) is not None

    def get(self, name: str, default: Any = None) -> Any:
        value = self.values.get(name)
        return default if value is None else value

    @property
    def method(self) -> str | None:
        return self.values.get("method")

    @property
    def weight_only(self) -> bool:
        return self.precision in QUANTIZED and self.method not in W8A8_METHODS


Rule = Callable[[Draft], None]


def budget_precision(d: Draft) -> None:
    """--max-ppl-increase mixes int4 and int8 layers: int4 is implied."""
    if not d.has("max_ppl_increase"):
        return
    if d.precision not in (None, "int4"):
        raise ConfigError("--max-ppl-increase mixes int4 and int8 layers: use it with --precision int4 or alone")
    if d.get("tune_epochs"):
        raise ConfigError("--tune-epochs and --max-ppl-increase do not combine: the budget's search compares "
                          "against the float model in the compressed basis, which tuned norms no longer match")
    d.precision = "int4"


def profile_precision(d: Draft) -> None:
    if d.precision is not None:
        return
    d.precision = d.profile.default_precision
    if d.precision in QUANTIZED and d.model_type in ENCODER_TYPES:
        p = d.profile
        fallback = "fp16" if p.gpu is not None and "fp16" in p.precisions else "fp32"
        d.notes.append(f"{p.id}'s default precision {d.precision} quantizes decoder weights; {d.model_type} is an "
                       f"encoder, exported at {fallback}")
        d.precision = fallback
    if d.precision not in IMPLEMENTED_PRECISIONS:
        p = d.profile
        fallback = "fp16" if p.gpu is not None and "fp16" in p.precisions else "fp32"
        d.notes.append(f"profile default precision {d.precision} is not produced by this version; using {fallback}")
        d.precision = fallback


def quantized_only(d: Draft) -> None:
    if d.precision in QUANTIZED:
        return
    if d.has("method"):
        raise ConfigError(f"--method applies to int8 and int4, not {d.precision}")
    if d.get("tune_epochs"):
        raise ConfigError(f"--tune-epochs tunes quantized weights: use it with int8 or int4, not {d.precision}")


def method(d: Draft) -> None:
    if d.precision not in QUANTIZED or d.has("method"):
        return
    d.values["method"] = d.profile.int8_method if d.precision == "int8" else DEFAULT_METHOD[d.precision]


def int8_weight_only_note(d: Draft) -> None:
    if d.precision == "int8" and d.weight_only:
        d.notes.append("int8 weight-only: activations stay float (W8A8: --method smoothquant or dynamic)")


def smoothquant_defaults(d: Draft) -> None:
    """W8A8 static: down_proj's input rotated by default (its outliers defeat smoothing alone); the profile's
    observer."""
    if d.precision != "int8" or d.method != "smoothquant":
        return
    if not d.has("rotate"):
        d.values["rotate"] = ROTATE_BLOCK
    if not d.has("observer"):
        d.values["observer"] = d.profile.int8_observer


def executorch_symmetric(d: Draft) -> None:
    """ExecuTorch's XNNPACK int4/int8 GEMMs take symmetric weights only."""
    if d.profile.backends[0] == "executorch" and d.weight_only and not d.get("symmetric"):
        d.values["symmetric"] = True
        d.notes.append(f"{d.profile.id}: symmetric {d.precision} weights (zero point 0), the form of ExecuTorch's "
                       "XNNPACK int4/int8 GEMMs")


def pow2_scales(d: Draft) -> None:
    if d.precision == "int8" and d.profile.int8_scales == "pow2-per-tensor" and d.method == "smoothquant":
        d.values["pow2_scales"] = True
        d.notes.append(f"{d.profile.id}: int8 weights and activations with symmetric, per-tensor, power-of-two "
                       "scales (the accelerator shifts instead of multiplying)")


def signed_scales(d: Draft) -> None:
    """Symmetric int4 may take negative scales where every backend multiplies by the scale as stored."""
    if d.precision not in QUANTIZED:
        return
    ok = all(b in SIGNED_SCALE_BACKENDS for b in d.profile.backends)
    if d.get("signed_scales") and not ok:
        others = ", ".join(b for b in d.profile.backends if b not in SIGNED_SCALE_BACKENDS)
        raise ConfigError(f"signed scales are for ONNX Runtime, TVM and llama.cpp; {d.profile.id} also builds for "
                          f"{others}")
    if d.get("symmetric") and ok and d.precision == "int4" and d.weight_only and not d.has("signed_scales"):
        d.values["signed_scales"] = True
        d.notes.append(f"{d.profile.id}: symmetric int4 groups whose positive end is the longer take a negative "
                       "scale, so the grid's extra level (-8) reaches that end (llama.cpp's Q4_0 grid)")


def lm_head(d: Draft) -> None:
    """The LM head: hot rows only on ONNX-Runtime-only targets; int4 with hot rows at int8 by default there for
    calibrated int4; else int8 where ONNX Runtime is the first backend (the head is much of what a token reads)."""
    if d.precision not in QUANTIZED:
        return
    p = d.profile
    ort_only = all(b == "onnxruntime" for b in p.backends)
    if d.get("lm_head_hot") and not ort_only:
        others = ", ".join(b for b in p.backends if b != "onnxruntime")
        raise ConfigError(f"--lm-head-hot makes an LM head that only ONNX Runtime graphs run; {p.id} also builds "
                          f"for {others}")
    if d.get("lm_head_hot"):
        d.values.setdefault("lm_head_bits", 4)  # hot rows are int8 rows of an int4 head
    # Hot rows are picked by calibration data: round-to-nearest (no data) keeps the int8 head below.
    if ort_only and d.precision == "int4" and d.method in ("gptq", "awq", "awq-gptq") \
            and not d.has("lm_head_bits") and not d.has("lm_head_hot"):
        d.values["lm_head_bits"], d.values["lm_head_hot"] = 4, HOT_ROWS
        d.notes.append(f"{p.id}: the LM head is int4, with the {HOT_ROWS:.0%} of its rows the calibration data reads "
                       "most kept at int8 too (its own MatMulNBits; the embedding keeps the float table); "
                       "--lm-head-bits 8 makes it all int8, 0 float")
    if p.backends[0] == "onnxruntime" and d.weight_only and not d.has("lm_head_bits"):
        d.values["lm_head_bits"] = 8
        d.notes.append(f"{p.id}: the LM head is quantized to int8 as well (its own MatMulNBits; the embedding keeps "
                       "the float table); --lm-head-bits 0 keeps it float, 4 makes it int4")


def accuracy_level(d: Draft) -> None:
    """A CPU without dot-product instructions multiplies with float32 activations at any level: level 1 makes the
    host's validation compute what the device computes."""
    p = d.profile
    if d.precision in QUANTIZED and p.graph_ops == "onnxruntime" and p.cpu.isa == "aarch64" \
            and "asimddp" not in p.cpu.features and not d.has("accuracy_level"):
        d.values["accuracy_level"] = 1
        d.notes.append(f"{p.id}'s CPU has no dot-product instructions, so ONNX Runtime multiplies the int4/int8 "
                       "weights with float32 activations there at any accuracy level; the artifact says level 1 so "
                       "that the host's validation computes the same")


def gguf_blocks(d: Draft) -> None:
    """A GGUF holds the compress stage's codes as ggml blocks (32 weights, one fp16 scale; Q8_0 without a zero
    point): where llamacpp is the plan's own backend, int8 weights are symmetric by default, and weights no GGUF
    type holds are refused before any work (the run would end in a compile error after the calibration's
    minutes); a secondary llamacpp backend is noted as not written, and the run goes on for the first backend."""
    p = d.profile
    if "llamacpp" not in p.backends or d.precision not in QUANTIZED:
        return
    from dataclasses import fields

    from slm_export.backends.llamacpp import plan_refusal

    if p.backends[0] == "llamacpp" and d.precision == "int8" and d.weight_only and not d.has("symmetric"):
        d.values["symmetric"] = True
        d.notes.append(f"{p.id}: symmetric int8 weights (zero point 0), the form of GGUF's Q8_0 blocks")
    names = {f.name for f in fields(CompressConfig)}
    why = plan_refusal(CompressConfig(**{k: v for k, v in d.values.items() if k in names}, precision=d.precision))
    if why is None:
        return
    if p.backends[0] == "llamacpp":
        raise ConfigError(f"{p.id} builds a GGUF for llama.cpp, which cannot hold these weights: {why}")
    d.notes.append(f"{p.id}: no GGUF for llamacpp, whose blocks cannot hold these weights: {why}")


def precision_notes(d: Draft) -> None:
    p = d.profile
    if d.precision in ("fp16", "bf16"):
        d.notes.append(f"{d.precision}: weights are stored at half width and upcast in the graph, so every op (norms, "
                       "softmax, rotary, residuals) computes in float32; half-precision GEMMs are the backend's "
                       f"choice on the device (TensorRT --{d.precision}), and host validation runs in float32")
    if p.static_shapes:
        d.notes.append(f"{p.id} needs static shapes: the graph takes exactly 1 x {p.max_seq_len} tokens "
                       "(right-padded, masked) and has no KV cache; each generated token recomputes the window")


def sparsity_notes(d: Draft) -> None:
    pattern, p = d.get("sparsity"), d.profile
    if not pattern:
        return
    d.notes.append("no default accuracy goal for a pruned model (pruning without fine-tuning costs small models "
                   "a lot): perplexity and agreement are reported for you to judge")
    if pattern in p.sparsity_patterns and not p.sparse_speedup:
        d.notes.append(f"{p.id} has no sparse hardware: {pattern} sparsity changes accuracy but gives no speed here, "
                       "and the artifact stores weights dense (no size gain either)")
    if p.sparse_speedup and p.backends[0] == "tensorrt":
        d.notes.append("build the TensorRT engine with sparse weights enabled: trtexec --sparsity=enable")


# In order: precision first, then the method, then what depends on both.
RULES: tuple[Rule, ...] = (budget_precision, profile_precision, quantized_only, method, int8_weight_only_note,
                           smoothquant_defaults, executorch_symmetric, pow2_scales, signed_scales, lm_head,
                           gguf_blocks, accuracy_level, precision_notes, sparsity_notes)


def make_plan(profile: TargetProfile, model: str, out: str | Path, precision: str | None = None,
              eval_data: str | None = None, validate: bool = True, **options: Any) -> Plan:
    """Fill every decision the user did not make from the profile, then let the profile check it.

    ``options`` are further ``Plan`` fields by name (method, group_size, calib_data, calib_samples, ...)."""
    parse_hub_id(model)  # refuses a malformed hub id before any work (a path or built-in name passes)
    unknown = set(options) - set(Plan.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown option(s): {', '.join(sorted(unknown))}")
    values = {k: v for k, v in options.items() if v is not None}
    check_values(Plan, values)
    draft = Draft(profile, precision, values, set(given(Plan, values)) - {"emulate", "force"},
                  model_type=peek_model_type(model))
    for rule in RULES:
        rule(draft)
    emulate = values.pop("emulate", "auto")
    if emulate not in ("on", "auto", "off"):
        raise ConfigError(f"emulate must be on, auto or off, not {emulate!r}")
    plan = Plan(target=profile.id, model=model, out=str(out), precision=draft.precision, backend=profile.backends[0],
                graph_ops=profile.graph_ops, opset=profile.opset, static_shapes=profile.static_shapes,
                max_seq_len=profile.max_seq_len, validation=profile.validation, eval_data=eval_data,
                validate=validate, emulate=emulate, notes=tuple(draft.notes),
                calib_holdout=values.get("max_ppl_increase") is not None, **values)
    plan = replace(plan, notes=(*plan.notes, *(IGNORED + n for n in unread(plan, draft.user))))
    profile.check(plan)
    plan = _emulation(plan, profile)
    _check_writable(Path(out))
    output.check_out(output.resolve_out(out), plan.force, (model, eval_data, plan.calib_data))
    return plan


def _emulation(plan: Plan, profile: TargetProfile) -> Plan:
    emulate = plan.emulate
    if emulate == "on" and profile.cpu.isa != "aarch64":
        raise UnsupportedByTarget(f"--emulate runs aarch64 code under QEMU; {profile.id} is {profile.cpu.isa}")
    if emulate == "auto" and (profile.validation != "emulator" or profile.cpu.isa != "aarch64"):
        emulate = "off"
    notes = plan.notes
    if profile.validation == "emulator" and plan.validate and emulate == "off":
        notes = (*notes, f"{profile.id} validates under emulation; --no-emulate: host figures only")
    elif profile.validation == "device" and plan.validate:
        notes = (*notes, f"{profile.id} validates on the device; this version validates on the host instead, and "
                 "says so on every figure")
    return replace(plan, emulate=emulate if plan.validate else "off", notes=notes)


def _check_writable(out: Path) -> None:
    """Fail before any work if the artifact cannot be written (root ignores permission bits, so try it)."""
    import os

    if out.exists() and not out.is_dir():
        raise ConfigError(f"cannot write the output folder {out}: it exists and is not a folder")
    probe = out.resolve().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"cannot write the output folder {out}: {probe} is a file, not a folder")
    try:
        test = probe / f".slm-export-probe-{os.getpid()}"
        test.mkdir()
        test.rmdir()
    except OSError as exc:
        raise ConfigError(f"cannot write the output folder {out}: {probe} is not writable ({exc.strerror})") from None


__all__ = ["DEFAULT_METHOD", "IGNORED", "RULES", "CompressConfig", "make_plan"]
