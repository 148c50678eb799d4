"""ONNX Runtime: graph optimizations done once, offline, for the target's CPU.

- ARM targets (phones, boards) get the ORT format (``model.ort``: flatbuffer, optimized, weights
  inside) that ONNX Runtime's mobile and minimal builds load, plus ``model.required_operators.config``,
  the operator list an app build passes to ORT's reduced-size build (``--include_ops_by_config``).
  Optimizations that make a file specific to one CPU (the NCHWc layout transformer, x86 only) are
  left out, and int8 Q/DQ fusions are allowed as ORT does for ARM (``session.qdqisint8allowed``).
  Half-precision artifacts keep their weights half width: they get the extended level without
  constant folding (the layout level and constant folding fold the upcasts into float32 weights).
- x86 targets get ``model.optimized.onnx`` (+ its external weights), to be loaded with graph
  optimizations off; the NCHWc layout (tied to the AVX width of the CPU that optimizes) only for the
  ``host`` target, which is this machine.

Either way the optimized file is what validation then runs, so the figures are the artifact's. Beside a
fused decoder's file go ``genai_config.json`` and the tokenizer files, for ONNX Runtime GenAI
(``backends/genai.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

from slm_export.backends.base import Availability, CompileJob, CompileResult
from slm_export.backends.genai import write_genai_files
from slm_export.backends.shared_data import share_weights
from slm_export.errors import CompileError, DeviceError

INSTALL = "pip install onnxruntime"


def _ort():  # type: ignore[no-untyped-def]
    try:
        import onnxruntime as ort
    except ImportError:
        raise DeviceError(f"onnxruntime is not installed; install it with: {INSTALL}") from None
    return ort


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def check(self) -> Availability:
        try:
            ort = _ort()
        except DeviceError:
            return Availability(self.name, False, None, "the onnxruntime package is not installed", INSTALL)
        return Availability(self.name, True, ort.__version__,
                            f"CPU execution provider; writes .ort (ORT format) for ARM targets and an offline-"
                            f"optimized ONNX for x86 ({', '.join(ort.get_available_providers())})")

    def compile(self, job: CompileJob) -> CompileResult:
        ort = _ort()
        src = job.model_path
        arm = job.profile.cpu.isa != "x86_64"
        so = ort.SessionOptions()
        so.log_severity_level = 3
        half = job.plan.precision in ("fp16", "bf16")
        # Half precision: the layout level folds the upcasts into float32 weights even with constant
        # folding off (measured); extended optimizations without constant folding keep them half width.
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if half
                                       else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        disabled = [] if job.profile.id == "host" else ["NchwcTransformer"]  # blocked layout: this CPU's only
        if half:
            disabled.append("ConstantFolding")
        if arm:
            out = src.with_suffix(".ort")
            so.add_session_config_entry("session.save_model_format", "ORT")
            so.add_session_config_entry("session.qdqisint8allowed", "1")
        else:
            out = src.with_name(src.stem + ".optimized.onnx")
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                        out.name + ".data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        so.optimized_model_filepath = str(out)
        # Prepacked weights are the session's own layout, never written to the file: packing them here only
        # held a second copy of a float model's weights while it was optimized.
        so.add_session_config_entry("session.disable_prepacking", "1")
        try:
            ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        except Exception as exc:
            raise CompileError(f"ONNX Runtime cannot load or optimize the exported graph: {exc}") from None
        files = [out.name]
        if arm:
            config = src.with_suffix(".required_operators.config")
            config.write_text(_required_ops(out))
            files.append(config.name)
            level = "extended graph optimizations without constant folding" if half else \
                "all graph optimizations except NCHWc"
            note = (f"ORT format for {job.profile.cpu.model} (onnxruntime {ort.__version__}, {level}); "
                    f"{config.name} lists the operators for ORT's reduced build")
        else:
            note = (f"offline-optimized ONNX for {job.profile.cpu.model} (onnxruntime {ort.__version__}, all "
                    f"graph optimizations{'' if not disabled else ' except NCHWc'}): load it with graph "
                    "optimizations disabled")
            note += _share(src, out, files)
        details = {"optimized_bytes": sum(os.path.getsize(out.parent / f) for f in files)}
        # ONNX Runtime GenAI's generator loads the folder as it is when its config sits beside the file
        genai_files, genai_note = write_genai_files(job, out)
        if genai_files:
            files += genai_files
            note += f"; {genai_note}"
        else:
            details["genai"] = genai_note
        return CompileResult(self.name, "done", note, tuple(files), runtime_model=out.name, details=details)


def _share(src: Path, out: Path, files: list[str]) -> str:
    """Point the optimized graph's copies of ``src``'s weights at ``src``'s data file (``shared_data.py``); its own
    data file joins ``files`` when some tensors are its own. Returns the note's clause."""
    shared, own_data = share_weights(src, out) if (out.parent / (out.name + ".data")).exists() else (0, False)
    if own_data:
        files.append(out.name + ".data")
    if not shared:
        return ""
    return (f"; it reads the {shared / 1e6:.1f} MB of weights it shares with {src.name} from {src.name}.data "
            "(stored once)")


def _required_ops(ort_model: Path) -> str:
    """The operator list (domain;opset;op,op,...) of an ORT-format model, the file format of ORT's
    ``--include_ops_by_config``, read with ORT's own flatbuffer reader."""
    from onnxruntime.tools.ort_format_model import OrtFormatModelProcessor  # type: ignore[import-untyped]
    from onnxruntime.tools.ort_format_model.operator_type_usage_processors import (  # type: ignore[import-untyped]
        OperatorTypeUsageManager,
    )

    required: dict[str, dict[int, set[str]]] = {}
    processor = OrtFormatModelProcessor(str(ort_model), required, OperatorTypeUsageManager())
    processor.process()
    lines = [f"# operators of {ort_model.name} (generated by slm-export)"]
    for domain in sorted(required):
        for opset in sorted(required[domain]):
            if required[domain][opset]:
                lines.append(f"{domain};{opset};{','.join(sorted(required[domain][opset]))}")
    return "\n".join(lines) + "\n"
