"""Plan and run: target profile -> load -> compress -> export -> compile -> validate -> report.

Each stage records its time, the process's peak RSS so far, and its output size. Everything is
written into a temporary folder beside the destination and renamed into place only at the end.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from slm_export import output
from slm_export.errors import (
    ConfigError,
    DiskFull,
    ExportError,
    SlmExportError,
    UnsupportedByTarget,
    ValidationFailed,
)
from slm_export.plan import IMPLEMENTED_PRECISIONS, QUANTIZED, Plan
from slm_export.report import SCHEMA_VERSION, default_goals, load_goals, write_report
from slm_export.targets import TargetProfile
from slm_export.validation.validate import ValidationSettings, peak_rss_mb

Progress = Callable[[str, str], None]  # (stage, message)


@dataclass(frozen=True)
class RunResult:
    """What ``run`` returns: the report and whether every goal passed."""

    report: dict[str, Any]
    out: Path | None

    @property
    def passed(self) -> bool:
        """No goal failed (a run with no goals, e.g. a pruned model, passes; see ``verdict``)."""
        return self.report["verdict"] in ("PASS", "NO GOALS")


# int4: AWQ's scales then GPTQ's rounding, measured on smollm2-135m (64 x 512 calibration, 8 x 512 evaluation):
# +3.45% perplexity asymmetric, +6.35% symmetric, against AWQ alone +10.6% and GPTQ alone +10.8% symmetric.
# GPTQ's group ranges weighted by the Hessian's diagonal (2026-12-04, bench_decode's host artifacts, int8 head,
# ORT): +4.96% -> +4.00% asymmetric, +6.76% -> +4.68% symmetric.
DEFAULT_METHOD = {"int4": "awq-gptq", "int8": "rtn"}


# Backends whose int4 kernels multiply by the scale as stored, so a group's scale may be negative.
SIGNED_SCALE_BACKENDS = ("onnxruntime", "tvm")
HOT_ROWS = 0.15  # int4 LM head: the fraction of its rows kept at int8 by default (ORT-only targets)
ROTATE_BLOCK = 128  # W8A8 static's default down_proj rotation: 128 multiply-adds per activation


def make_plan(profile: TargetProfile, model: str, out: str | Path, precision: str | None = None,
              eval_data: str | None = None, validate: bool = True, **options: Any) -> Plan:
    """Fill every decision the user did not make from the profile, then let the profile check it.

    ``options`` are further ``Plan`` fields (method, group_size, calib_data, calib_samples, ...).
    """
    notes = []
    _check_ranges(options)
    given = {k for k, v in options.items() if v is not None and k not in ("emulate", "force")}
    if options.get("max_ppl_increase") is not None:
        budget = options["max_ppl_increase"]
        if not 0 < budget < 1000:
            raise ConfigError(f"--max-ppl-increase must be a positive percentage, not {budget}")
        if precision not in (None, "int4"):
            raise ConfigError("--max-ppl-increase mixes int4 and int8 layers: use it with --precision int4 or alone")
        precision = "int4"
    if precision is None:
        precision = profile.default_precision
        if precision not in IMPLEMENTED_PRECISIONS:
            fallback = "fp16" if profile.gpu is not None and "fp16" in profile.precisions else "fp32"
            notes.append(f"profile default precision {precision} is not produced by this version; using {fallback}")
            precision = fallback
    unknown = set(options) - set(Plan.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown option(s): {', '.join(sorted(unknown))}")
    options = {k: v for k, v in options.items() if v is not None}
    options.setdefault("emulate", "auto")
    if options["emulate"] not in ("on", "auto", "off"):
        raise ConfigError(f"emulate must be on, auto or off, not {options['emulate']!r}")
    if precision in QUANTIZED:
        options.setdefault("method", profile.int8_method if precision == "int8" else DEFAULT_METHOD[precision])
        if precision == "int8" and options["method"] not in ("smoothquant", "dynamic"):
            notes.append("int8 weight-only: activations stay float (W8A8: --method smoothquant or dynamic)")
        if precision == "int8" and options["method"] == "smoothquant" and "rotate" not in options:
            options["rotate"] = ROTATE_BLOCK  # measured: +3.1% -> +0.8% perplexity on smollm2-135m (README)
        if precision == "int8" and options["method"] == "smoothquant":
            options.setdefault("observer", profile.int8_observer)
        if profile.backends[0] == "executorch" and options["method"] not in ("smoothquant", "dynamic") \
                and not options.get("symmetric"):
            options["symmetric"] = True
            notes.append(f"{profile.id}: symmetric {precision} weights (zero point 0), the form of ExecuTorch's "
                         "XNNPACK int4/int8 GEMMs")
        if precision == "int8" and profile.int8_scales == "pow2-per-tensor" and options["method"] == "smoothquant":
            options["pow2_scales"] = True
            notes.append(f"{profile.id}: int8 weights and activations with symmetric, per-tensor, power-of-two "
                         "scales (the accelerator shifts instead of multiplying)")
        signed_ok = all(b in SIGNED_SCALE_BACKENDS for b in profile.backends)
        if options.get("signed_scales") and not signed_ok:
            others = ", ".join(b for b in profile.backends if b not in SIGNED_SCALE_BACKENDS)
            raise ConfigError(f"signed scales are for ONNX Runtime and TVM; {profile.id} also builds for {others}")
        if options.get("symmetric") and signed_ok and precision == "int4" \
                and options["method"] not in ("smoothquant", "dynamic") and "signed_scales" not in options:
            options["signed_scales"] = True
            notes.append(f"{profile.id}: symmetric int4 groups whose positive end is the longer take a negative "
                         "scale, so the grid's extra level (-8) reaches that end (llama.cpp's Q4_0 grid)")
        ort_only = all(b == "onnxruntime" for b in profile.backends)
        if options.get("lm_head_hot") and not ort_only:
            others = ", ".join(b for b in profile.backends if b != "onnxruntime")
            raise ConfigError(f"--lm-head-hot makes an LM head that only ONNX Runtime graphs run; {profile.id} also "
                              f"builds for {others}")
        if options.get("lm_head_hot"):
            options.setdefault("lm_head_bits", 4)  # hot rows are int8 rows of an int4 head
        # Hot rows are picked by calibration data: round-to-nearest (no data) keeps the int8 head below.
        if ort_only and precision == "int4" and options["method"] in ("gptq", "awq", "awq-gptq") \
                and "lm_head_bits" not in options and "lm_head_hot" not in options:
            # smollm2-135m, same AWQ+GPTQ layers, Zen 5 host (AVX-512 VNNI), 10 interleaved rounds of a
            # scratch A/B (1 / median step time; perplexity by bench_decode's scoring): int8 head 229 tok/s,
            # +4.24%; int4 head 254, +4.81%; 5% hot rows 244, +4.37%; 15% hot rows 251, +4.17%.
            options["lm_head_bits"], options["lm_head_hot"] = 4, HOT_ROWS
            notes.append(f"{profile.id}: the LM head is int4, with the {HOT_ROWS:.0%} of its rows the calibration "
                         "data reads most kept at int8 too (its own MatMulNBits; the embedding keeps the float "
                         "table); --lm-head-bits 8 makes it all int8, 0 float")
        if profile.backends[0] == "onnxruntime" and options["method"] not in ("smoothquant", "dynamic") \
                and "lm_head_bits" not in options:
            # The tied head is a fifth of smollm2's weights but, float, 62% of what an int4 token reads (48% for
            # int8). int8, GPTQ-rounded on the head's inputs: an int4 head measured no faster on the host
            # (interleaved A/B: 89.5 vs 90.9 tok/s) and cost +1.1 points of perplexity.
            options["lm_head_bits"] = 8
            notes.append(f"{profile.id}: the LM head is quantized to int8 as well (its own MatMulNBits; the "
                         "embedding keeps the float table); smollm2-135m AWQ+GPTQ int4 on the host: 181 -> 101 MB "
                         "read per token, 59.8 -> 75.0 tok/s (one bench run), perplexity change +3.24% -> "
                         "+3.28%; --lm-head-bits 0 keeps it float, 4 makes it int4 (86 MB, +4.37%, no faster on "
                         "the host)")
        if profile.graph_ops == "onnxruntime" and profile.cpu.isa == "aarch64" and "asimddp" not in \
                profile.cpu.features and "accuracy_level" not in options:
            # Measured under qemu-aarch64 -cpu cortex-a72: MatMulNBits at level 4 returns exactly its level-1
            # (float32) output there, while x86 quantizes the activations to int8. Level 1 makes the host
            # validation compute what the device computes; the device runs the same kernel either way.
            options["accuracy_level"] = 1
            notes.append(f"{profile.id}'s CPU has no dot-product instructions, so ONNX Runtime multiplies the "
                         "int4/int8 weights with float32 activations there at any accuracy level; the artifact says "
                         "level 1 so that the host's validation computes the same")
        if options.get("tune_epochs") and options.get("max_ppl_increase") is not None:
            raise ConfigError("--tune-epochs and --max-ppl-increase do not combine: the budget's search compares "
                              "against the float model in the compressed basis, which tuned norms no longer match")
    elif options.get("method"):
        raise ConfigError(f"--method applies to int8 and int4, not {precision}")
    elif options.get("tune_epochs"):
        raise ConfigError(f"--tune-epochs tunes quantized weights: use it with int8 or int4, not {precision}")
    if precision in ("fp16", "bf16"):
        notes.append(f"{precision}: weights are stored at half width and upcast in the graph, so every op (norms, "
                     "softmax, rotary, residuals) computes in float32; half-precision GEMMs are the backend's choice "
                     f"on the device (TensorRT --{precision}), and host validation runs in float32")
    if profile.static_shapes:
        notes.append(f"{profile.id} needs static shapes: the graph takes exactly 1 x {profile.max_seq_len} tokens "
                     "(right-padded, masked) and has no KV cache; each generated token recomputes the window")
    if options.get("sparsity"):
        notes.append("no default accuracy goal for a pruned model (pruning without fine-tuning costs small models "
                     "a lot): perplexity and agreement are reported for you to judge")
        if options["sparsity"] in profile.sparsity_patterns and not profile.sparse_speedup:
            notes.append(f"{profile.id} has no sparse hardware: {options['sparsity']} sparsity changes accuracy "
                         "but gives no speed here, and the artifact stores weights dense (no size gain either)")
        if profile.sparse_speedup and profile.backends[0] == "tensorrt":
            notes.append("build the TensorRT engine with sparse weights enabled: trtexec --sparsity=enable")
    plan = Plan(
        target=profile.id, model=model, out=str(out), precision=precision, backend=profile.backends[0],
        graph_ops=profile.graph_ops, opset=profile.opset, static_shapes=profile.static_shapes,
        max_seq_len=profile.max_seq_len, validation=profile.validation, eval_data=eval_data,
        validate=validate, notes=tuple(notes), **options,
    )
    if precision in QUANTIZED or plan.sparsity:
        compress_config(plan)  # validates method, group size, samples, pattern before any work
    ignored = _unused(plan, given)
    if ignored:
        plan = replace(plan, notes=(*plan.notes, *ignored))
    profile.check(plan)
    emulate = plan.emulate
    if emulate == "on" and profile.cpu.isa != "aarch64":
        raise UnsupportedByTarget(f"--emulate runs aarch64 code under QEMU; {profile.id} is {profile.cpu.isa}")
    if emulate == "auto" and (profile.validation != "emulator" or profile.cpu.isa != "aarch64"):
        emulate = "off"
    if profile.validation == "emulator" and validate and emulate == "off":
        plan = replace(plan, notes=(*plan.notes, f"{profile.id} validates under emulation; --no-emulate: host "
                                    "figures only"))
    elif profile.validation == "device" and validate:
        plan = replace(plan, notes=(*plan.notes, f"{profile.id} validates on the device; this version validates "
                                    "on the host instead, and says so on every figure"))
    plan = replace(plan, emulate=emulate if validate else "off")
    _check_writable(Path(out))
    output.check_out(output.resolve_out(out), plan.force, (model, eval_data, plan.calib_data))
    return plan


# Whole-number options and their lowest value (and highest, where one exists): refused before any work.
INT_RANGES = {"calib_samples": (1, None), "calib_seqlen": (8, None), "seed": (0, None), "group_size": (1, None),
              "rotate": (0, None), "tune_epochs": (0, None)}


def _check_ranges(options: dict[str, Any]) -> None:
    for name, (low, high) in INT_RANGES.items():
        value = options.get(name)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{flag} must be a whole number, not {value!r}")
        if value < low or (high is not None and value > high):
            raise ConfigError(f"{flag} must be at least {low}, not {value}")
    ratio = options.get("sparsity_ratio")
    if ratio is not None and not 0 < ratio < 1:
        raise ConfigError(f"--sparsity-ratio is the fraction of weights removed, in (0, 1), not {ratio}")
    alpha = options.get("smooth_alpha")
    if alpha is not None and not 0 <= alpha <= 1:
        raise ConfigError(f"--smooth-alpha is a migration strength in [0, 1], not {alpha}")


IGNORED = "ignored: "  # the prefix of a note about an option the plan does not read; the CLI prints it as a warning


def _unused(plan: Plan, given: set[str]) -> list[str]:
    """Options the user gave that this plan does not read: a note each, never silently dropped. Not an error: a
    pipeline may pass the same flags to every target of a matrix."""
    quantized = plan.precision in QUANTIZED
    cfg = compress_config(plan) if quantized or plan.sparsity else None
    data = cfg is not None and (cfg.needs_data or cfg.tune_epochs > 0)
    w8a8 = quantized and plan.method in ("smoothquant", "dynamic")
    applies = {
        "group_size": (quantized and not w8a8, "weight-only int8 and int4"),
        "symmetric": (quantized and not w8a8, "weight-only int8 and int4"),
        "accuracy_level": (quantized, "int8 and int4"),
        "lm_head_bits": (quantized, "int8 and int4"),
        "observer": (quantized and plan.method == "smoothquant", "--method smoothquant"),
        "smooth_alpha": (quantized and plan.method == "smoothquant", "--method smoothquant"),
        "calib_data": (data, "methods that calibrate (not round-to-nearest, dynamic or magnitude pruning)"),
        "calib_samples": (data, "methods that calibrate (not round-to-nearest, dynamic or magnitude pruning)"),
        "calib_seqlen": (data, "methods that calibrate (not round-to-nearest, dynamic or magnitude pruning)"),
        "seed": (data or plan.rotate > 0, "methods that draw calibration samples"),
        "sparsity_method": (plan.sparsity is not None, "--sparsity"),
        "sparsity_ratio": (plan.sparsity == "unstructured", "--sparsity unstructured"),
    }
    what = plan.precision + (f" --method {plan.method}" if plan.method else "")
    return [f"{IGNORED}--{name.replace('_', '-')} applies to {where}; this plan ({what}) does not read it"
            for name, (ok, where) in applies.items() if name in given and not ok]


def compress_config(plan: Plan) -> Any:
    """The compress stage's config for a quantized or sparse plan."""
    from slm_export.calibration.compress import CompressConfig
    from slm_export.sparsity import SparsityConfig

    sparsity = SparsityConfig(plan.sparsity, plan.sparsity_method, plan.sparsity_ratio) if plan.sparsity else None
    quantized = plan.precision in QUANTIZED
    return CompressConfig(precision=plan.precision if quantized else "none",
                          method=plan.method or DEFAULT_METHOD.get(plan.precision, "rtn"), sparsity=sparsity,
                          group_size=plan.group_size, symmetric=plan.symmetric,
                          signed_scales=plan.signed_scales, calib_data=plan.calib_data,
                          calib_samples=plan.calib_samples, calib_seqlen=plan.calib_seqlen, seed=plan.seed,
                          lm_head_bits=plan.lm_head_bits, lm_head_hot=plan.lm_head_hot,
                          smooth_alpha=plan.smooth_alpha, observer=plan.observer,
                          pow2=plan.pow2_scales, rotate=plan.rotate, tune_epochs=plan.tune_epochs,
                          calib_holdout=plan.max_ppl_increase is not None)


def _check_writable(out: Path) -> None:
    """Fail before any work if the artifact cannot be written (root ignores permission bits, so try it)."""
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


class Stages:
    def __init__(self, progress: Progress | None) -> None:
        self.records: list[dict[str, Any]] = []
        self.progress = progress

    def run(self, name: str, fn: Callable[[], Any], size: Callable[[Any], int] | None = None) -> Any:
        if self.progress:
            self.progress(name, "start")
        t = time.perf_counter()
        try:
            result = fn()
        except BaseException:
            self.records.append({"name": name, "status": "failed", "seconds": time.perf_counter() - t,
                                 "peak_rss_mb": peak_rss_mb()})
            raise
        rec = {"name": name, "status": "done", "seconds": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb()}
        if size is not None:
            rec["output_bytes"] = size(result)
        self.records.append(rec)
        if self.progress:
            self.progress(name, "done")
        return result

    def skip(self, name: str, note: str) -> None:
        self.records.append({"name": name, "status": "skipped", "seconds": 0.0, "peak_rss_mb": peak_rss_mb(),
                             "note": note})


def run(plan: Plan, profile: TargetProfile, progress: Progress | None = None,
        settings: ValidationSettings | None = None) -> RunResult:
    """Execute ``plan``. Raises ``ValidationFailed`` (carrying the report) when a goal is missed.

    The output folder is checked, locked and cleared of dead runs' leftovers before any work; the artifact is
    built in a hidden partial folder beside it and moved into place only at the end (``output.py``).
    """
    settings = settings or ValidationSettings()
    out = output.resolve_out(plan.out)
    with output.OutputLock(out):
        cleaned = output.remove_stale(out)
        for note in cleaned:
            if progress:
                progress("output", note)
        state = output.check_out(out, plan.force, (plan.model, plan.eval_data, plan.calib_data,
                                                   settings.goals_file))
        keep_passing = state == "artifact" and output.passing_verdict(out)
        failed_state = output.check_out(output.failed_name(out), plan.force) if keep_passing else ""
        check_inputs(plan)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        need = 0
        try:
            tmp.mkdir(parents=True, exist_ok=False)
            report, need = _build(plan, profile, settings, tmp, progress)
            report["output"] = {"folder": str(out), "replaced": state, "stale_removed": cleaned,
                                "predicted_bytes": need}
            report["notes"] = [*report["notes"], *cleaned]
            dest = out
            if report["verdict"] == "FAIL" and keep_passing:
                dest = output.failed_name(out)
                report["output"].update(replaced=failed_state, kept_passing_artifact=str(out))
            report["output"]["folder"] = str(dest)
            _seal(report, tmp)
            output.place(tmp, dest)
        except BaseException as exc:
            # Runtimes word a full disk their own way ("Failed to write external initializers"): a disk with
            # almost nothing left at the moment of the failure is taken as the cause.
            full = output.is_disk_full(exc) or output.free_bytes(out.parent) < output.NEARLY_FULL
            shutil.rmtree(tmp, ignore_errors=True)
            user_error = isinstance(exc, SlmExportError) and exc.exit_code in (1, 2)
            if full and isinstance(exc, Exception) and not user_error and not isinstance(exc, DiskFull):
                free = output.free_bytes(out.parent)
                raise DiskFull(f"disk full while writing the artifact in {out.parent}: {free / 1e6:.0f} MB free, "
                               f"about {need / 1e6:.0f} MB needed; nothing was written. Free some space or choose "
                               "another --out") from None
            raise
    result = RunResult(report, dest)
    if report["verdict"] == "FAIL":
        message = failed_message(report)
        if dest != out:
            message += f". The passing artifact in {out} was kept; this run's artifact is in {dest}"
        raise ValidationFailed(message, report)
    return result


def check_inputs(plan: Plan) -> None:
    """The evaluation and calibration files: present, text, not empty; before any model is loaded."""
    from slm_export.validation.text import check_text_input

    if plan.eval_data is not None and plan.validate:
        check_text_input(plan.eval_data, "evaluation")
    if plan.calib_data is not None and (plan.precision in QUANTIZED or plan.sparsity):
        check_text_input(plan.calib_data, "calibration")
    if plan.max_ppl_increase is not None:
        from slm_export.calibration.data import check_budget_sources

        check_budget_sources(plan.calib_data, plan.eval_data)


# Bytes per weight as stored, scales and zero points included; the embedding table stays float32 in quantized
# graphs. A prediction to refuse a run that cannot fit, not a promise.
STORED_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.1, "int4": 0.65}


def predicted_bytes(model: Any, plan: Plan, profile: TargetProfile) -> int:
    """The artifact's size on disk: one copy of the weights in the ONNX graph and one per backend."""
    vocab = getattr(model.config, "vocab_size", None)
    embed = max((t.numel() for n, t in model.weights.items() if t.dim() == 2 and t.shape[0] == vocab), default=0)
    params = model.weight_bytes // 4
    width = STORED_BYTES.get(plan.precision, 4.0)
    one = embed * 4 + (params - embed) * width if plan.precision in QUANTIZED else params * width
    copies = 1 + len(profile.backends)  # ONNX Runtime writes its optimized graph, a copy of the weights too
    return int(one * copies * 1.05)


def _build(plan: Plan, profile: TargetProfile, settings: ValidationSettings, tmp: Path,
           progress: Progress | None) -> tuple[dict[str, Any], int]:
    """The stages, into ``tmp``: the report (not yet written) and the predicted artifact size."""
    from slm_export.backends import CompileJob, compile_all, validated_file
    from slm_export.exporters.onnx import OnnxExporter
    from slm_export.models import load_model

    stages = Stages(progress)
    model = stages.run("load", lambda: load_model(plan.model), lambda m: m.weight_bytes)
    need = predicted_bytes(model, plan, profile)
    output.check_space(tmp, need)
    early_notes = [n for n in [_check_eval_tokens(model, plan, settings)] if n] if plan.validate else []
    compressed = None
    if plan.precision in QUANTIZED or plan.sparsity:
        from slm_export.calibration.compress import compress

        cfg = compress_config(plan)
        step = (lambda what: progress("compress", what)) if progress else None
        compressed = stages.run("compress", lambda: compress(model, cfg, step))
        if plan.max_ppl_increase is not None:
            from slm_export.calibration.budget import fit_budget

            compressed = stages.run("budget", lambda: fit_budget(model, compressed, plan, progress))
    else:
        stages.skip("compress", f"{plan.precision} needs no calibration")
    weights = compressed.weights if compressed else None
    exported = stages.run("export", lambda: OnnxExporter().export(model, plan, tmp, weights), lambda e: e.bytes)
    job = CompileJob(plan, profile, exported.model_path, model.kind, model=model, weights=weights)
    results = stages.run("compile", lambda: compile_all(job))
    compiled = results[0]
    if compiled.status != "done":
        stages.records[-1].update(status="not run", note=compiled.note)
    runtime_file = validated_file(results, exported.model_path.name)
    metrics: dict[str, Any] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    if plan.validate:
        metrics = stages.run("validate", lambda: validate_file(model, tmp / runtime_file, plan, settings, progress))
        if model.kind == "decoder":
            metrics.update(further_runs(model, tmp, results, runtime_file, plan, profile, settings, stages,
                                         runs, progress))
    else:
        stages.skip("validate", "--no-validate")
    report = build_report(plan, profile, model, exported, compiled, metrics, stages.records, settings.goals_file)
    report["backends"] = [asdict(r) for r in results]
    report["validated_file"] = runtime_file if plan.validate else None
    report["compression"] = _compression_section(compressed)
    report["notes"] = [*report["notes"], *early_notes]
    budget = (report["compression"] or {}).get("budget")
    if budget and "perplexity_change_pct" in metrics:  # the figure the budget reached on the evaluation text
        budget["eval_ppl_change_pct"] = metrics["perplexity_change_pct"]["value"]
    report["crosschecks"] = runs.get("crosscheck", [])
    report["emulation"] = runs.get("emulate", [])
    report["device"] = runs.get("device", [])
    if plan.sparsity:
        from slm_export.sparsity.verify import verify_sparsity

        report["sparsity"] = verify_sparsity(exported.model_path, plan.sparsity)
        if not report["sparsity"]["all_satisfy_pattern"]:
            raise ExportError(f"exported weights break the {plan.sparsity} pattern: {report['sparsity']}")
    return report, need


def _check_eval_tokens(model: Any, plan: Plan, settings: ValidationSettings) -> str | None:
    """Enough evaluation tokens for one window, found before minutes of calibration are spent; a note when the
    text holds fewer windows than asked."""
    from slm_export.validation.text import check_token_count, load_text

    text = load_text(plan.eval_data, "evaluation")
    return check_token_count(model.tokenizer, text, settings.windows, settings.window_len, "evaluation")


def _seal(report: dict[str, Any], tmp: Path) -> None:
    """Hash every file, name them in the report, write the report, then seal the reports in the manifest."""
    from slm_export import integrity

    table = integrity.file_table(tmp)
    report["integrity"] = {"algorithm": "sha256", "hashed_at": integrity.now(), "manifest": integrity.MANIFEST_FILE,
                           "files": {k: v["bytes"] for k, v in table.items()},
                           "also_sealed": [*integrity.REPORTS, integrity.MANIFEST_FILE]}
    write_report(report, tmp)
    manifest = integrity.read_manifest(tmp)
    table.update({name: {"bytes": (tmp / name).stat().st_size, "sha256": integrity.sha256_file(tmp / name)}
                  for name in integrity.REPORTS})
    integrity.seal(tmp, manifest, table)


def validate_file(model: Any, path: Path, plan: Plan, settings: ValidationSettings, progress: Progress | None) -> Any:
    from slm_export.validation.text import load_text
    from slm_export.validation.validate import validate_decoder, validate_encoder

    text = load_text(plan.eval_data, "evaluation")
    fn = validate_decoder if model.kind == "decoder" else validate_encoder
    step = (lambda what: progress("validate", what)) if progress else None
    from slm_export.backends import EXACT_QDQ

    if plan.backend in EXACT_QDQ and path.suffix == ".onnx":  # TensorRT, the DPU: exact int8 arithmetic
        settings = replace(settings, exact_qdq=True)
    metrics = fn(path, model.torch_module(), model.tokenizer, text, settings, step)
    metrics["eval_text"] = {"value": text.name, "unit": f"sha256 {text.sha256[:16]}", "where": "input"}
    return metrics


def further_runs(model: Any, folder: Path, results: list[Any], validated: str, plan: Plan, profile: TargetProfile,
                  settings: ValidationSettings, stages: Stages, runs: dict[str, Any],
                  progress: Progress | None) -> dict[str, Any]:
    """The cross-checks of the other backends' files on the host, then the emulated runs of the target's own
    files (each a stage of its own); their metrics, with their details put in ``runs``."""
    from slm_export.validation import runs as checks
    from slm_export.validation.text import load_text

    text = load_text(plan.eval_data, "evaluation")
    metrics: dict[str, Any] = {}
    if any(r.status == "done" and r.runtime_model and r.runtime_model != validated for r in results):
        m, runs["crosscheck"] = stages.run("crosscheck", lambda: checks.crosscheck(
            model, folder, results, validated, text, settings, progress))
        metrics.update(m)
    # A device given: the emulator's stand-in is not needed unless asked for (--emulate).
    if plan.emulate == "on" or (plan.emulate == "auto" and not settings.device):
        m, runs["emulate"] = stages.run("emulate", lambda: checks.emulate(
            model, folder, results, profile, text, settings, plan.emulate == "on", progress))
        metrics.update(m)
    if settings.device:
        m, device = stages.run("device", lambda: checks.on_device(model, folder, results, validated, text, settings,
                                                                   progress))
        runs["device"] = [device]
        metrics.update(m)
    return metrics


def _compression_section(result: Any) -> dict[str, Any] | None:
    if result is None:
        return None
    layers = sorted(result.layers, key=lambda e: e.get("output_sqnr_db", e["weight_sqnr_db"]))
    return {"calibration": result.calibration, "seconds": result.seconds, "bits_per_weight": result.bits_per_weight,
            "notes": result.notes, "layers": result.layers, "budget": result.budget, "tuning": result.tuning,
            "least_accurate_layers": [e["layer"] for e in layers[:5]]}


def failed_message(report: dict[str, Any]) -> str:
    failed = [g for g in report["goals"] if g["status"] == "FAIL"]
    parts = [f"{g['metric']} = {g.get('value')} (goal {g['op']} {g['threshold']})" for g in failed]
    return "goals missed: " + "; ".join(parts)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "machine": platform.machine()}
    for pkg in ("slm-export", "torch", "transformers", "onnx", "onnxruntime", "numpy", "gguf"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def build_report(plan: Plan, profile: TargetProfile, model: Any, exported: Any, compiled: Any,
            metrics: dict[str, Any], stages: list[dict[str, Any]], goals_file: str | None = None) -> dict[str, Any]:
    from slm_export.validation.runs import run_goals

    roof = {}
    if model.kind == "decoder":
        est = profile.roofline(exported.weight_bytes_per_token, exported.flops_per_token, plan.precision)
        roof = {f"{profile.id}_decode_tokens_per_s_bound": est["decode_tokens_per_s"],
                f"{profile.id}_prefill_tokens_per_s_bound": est["prefill_tokens_per_s"],
                "weight_bytes_read_per_token": exported.weight_bytes_per_token,
                "bandwidth_gbs": est["bandwidth_gbs"], "peak_gflops": est["peak_gflops"],
                "source": f"{profile.id} profile: memory.bandwidth_gbs, compute.{plan.precision}"}
    bound = roof.get(f"{profile.id}_decode_tokens_per_s_bound")
    if bound and "device_decode_tokens_per_s_p50" in metrics:
        measured = metrics["device_decode_tokens_per_s_p50"]
        metrics = {**metrics, "device_decode_fraction_of_roofline": {
            "value": measured["value"] / bound, "unit": "", "where": f"{measured['where']}, over the {profile.id} "
            f"profile's roofline bound ({bound:.1f} tokens/s, estimated)"}}
    if bound and profile.id == "host" and "decode_tokens_per_s_p50" in metrics:
        # the host is the target: its own run against its own (measured-bandwidth) roofline
        measured = metrics["decode_tokens_per_s_p50"]
        metrics = {**metrics, "decode_fraction_of_roofline": {
            "value": measured["value"] / bound, "unit": "", "where": f"{measured['where']}, over the host's "
            f"roofline bound ({bound:.1f} tokens/s: measured bandwidth / weight bytes read per token)"}}
    if goals_file:
        wanted = load_goals(goals_file)
    else:
        quantized = plan.precision in QUANTIZED
        act_quant = quantized and (plan.method in ("smoothquant", "dynamic") or plan.accuracy_level == 4)
        wanted = default_goals(model.kind, plan.precision, plan.method, plan.sparsity, plan.max_ppl_increase,
                               plan.pow2_scales) + run_goals(metrics, quantized, act_quant)
    goals = [g.evaluate(metrics) for g in wanted] if metrics else []
    if not metrics:
        verdict = "NOT VALIDATED"
    elif not wanted:
        verdict = "NO GOALS"
    else:
        verdict = "PASS" if all(g["status"] == "PASS" for g in goals) else "FAIL"
    artifact_bytes = sum(f.stat().st_size for f in Path(exported.model_path).parent.rglob("*") if f.is_file())
    metrics = {**metrics,
               "artifact_bytes": {"value": artifact_bytes, "unit": "bytes", "where": "artifact folder"},
               "peak_rss_mb": {"value": peak_rss_mb(), "unit": "MB",
                               "where": "measured on host: whole run (load, export, validation) in one process"}}
    return {
        "schema_version": SCHEMA_VERSION, "verdict": verdict, "notes": list(plan.notes),
        "target": {"id": profile.id, "name": profile.name, "origin": profile.origin},
        "model": {"name": model.name, "path": model.path, "format": model.fmt, "kind": model.kind,
                  "architecture": model.model_type, "fingerprint": model.fingerprint,
                  "float32_weight_bytes": model.weight_bytes},
        "plan": plan.to_dict(), "artifact": {"files": list(exported.files), "bytes": exported.bytes,
                                             "graph_ops": exported.graph_ops, "opset": exported.opset},
        "compile": asdict(compiled),
        "stages": stages, "metrics": metrics, "goals": goals, "roofline": roof, "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


__all__ = ["RunResult", "SlmExportError", "make_plan", "run"]
