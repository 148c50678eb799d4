"""llama.cpp: ``model.gguf``, the file llama.cpp (its CLI, server, Android and Raspberry Pi builds) loads.

The compress stage's own codes and scales go in as ggml blocks, so the GGUF holds the weights that were
measured here (GPTQ/AWQ rounding included, which llama.cpp's own converter cannot reproduce from a float
checkpoint): symmetric int4 as Q4_0, asymmetric int4 as Q4_1, symmetric int8 as Q8_0, a group of 64 or 128
as that many 32-weight blocks with the same scale (``blocks.py``). The only change is the scales' rounding to
fp16, measured per file (``max_abs_weight_diff`` in the details). Float plans are F32 (fp32), F16 (fp16) or
BF16 (bf16) matrices; norms and biases stay F32, holding the values the artifact's graph uses. The
tokenizer is written in full (``vocab.py``), q/k rows permuted for the llama architecture
(``gguf_file.py``).

Refused, with the reason: group sizes that are not a multiple of 32, W8A8 (int8 activations), asymmetric
int8 (Q8_0 has no zero point), an LM head with hot rows, architectures other than llama, mistral and
qwen2, and tokenizers other than byte-level BPE with a pre-tokenizer llama.cpp knows. ``plan_refusal``
says it from the plan alone, before any work; the plan's own backend fails the run (exit 3), a profile's
secondary backend is reported as not run.

Validation runs the ``.gguf`` through llama.cpp itself, its Python bindings (``llama-cpp-python``), with the
runner's GGUF decoder (``runner/gguf_run.py``); without them the file is written but not run here.
"""

from __future__ import annotations

import time
from typing import Any

from slm_export.backends.base import Availability, CompileJob, CompileResult
from slm_export.backends.llamacpp.blocks import BLOCK
from slm_export.backends.llamacpp.gguf_file import ARCHITECTURES, write_gguf
from slm_export.errors import CompileError

GGUF_FILE = "model.gguf"
INSTALL = ("pip install llama-cpp-python (builds llama.cpp from source: needs cmake and a C/C++ compiler); the "
           ".gguf is written without it, but validation runs it only where it imports")


def runtime_version() -> str | None:
    """The installed llama-cpp-python's version when its bindings import, else None."""
    try:
        import llama_cpp

        return str(getattr(llama_cpp, "__version__", "unknown"))
    except Exception:  # not installed, or a build whose shared library does not load
        return None


def plan_refusal(plan: Any) -> str | None:
    """Why the plan's weights cannot become a GGUF, from the plan alone (None when they can); the planner may
    call it before any work."""
    if plan.precision not in ("int8", "int4"):
        return None
    if plan.w8a8:
        return (f"--method {plan.method} quantizes activations to int8 too (W8A8); llama.cpp takes weight-only "
                "int8/int4 and quantizes activations its own way")
    if plan.group_size % BLOCK:
        return (f"group size {plan.group_size}: ggml blocks hold {BLOCK} weights with one scale, so the group size "
                f"must be a multiple of {BLOCK} (--group-size 32, 64, 128 ...)")
    if plan.lm_head_hot:
        return "an LM head with hot rows (--lm-head-hot) has two widths; a GGUF tensor has one: --lm-head-hot 0"
    asym8 = ("Q8_0, GGUF's int8 block, is symmetric (no zero point): export with --symmetric" +
             ("" if plan.precision == "int8" else " or --lm-head-bits 0 or 4"))
    if not plan.symmetric and (plan.precision == "int8" or plan.lm_head_bits == 8):
        return f"asymmetric int8 {'weights' if plan.precision == 'int8' else 'LM head'}: {asym8}"
    if not plan.symmetric and plan.max_ppl_increase is not None:
        return ("the accuracy budget raises layers to asymmetric int8, and Q8_0 is symmetric: export with "
                "--symmetric")
    return None


def model_refusal(config: Any) -> str | None:
    """Why llama.cpp's graph for this architecture would compute something else (None when it would not)."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        return (f"architecture {kind!r}: this version writes GGUF for {', '.join(ARCHITECTURES)} (llama.cpp's "
                "llama and qwen2 graphs)")
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        return f"activation {act!r}: llama.cpp's {ARCHITECTURES[kind]} graph uses SiLU"
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "a sliding attention window: llama.cpp's llama and qwen2 graphs attend to the whole context"
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        return "a partial rotary embedding: llama.cpp's llama and qwen2 graphs rotate whole heads"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope != "default":
        return f"rope type {rope!r}: this version writes the default rotary embedding's base only"
    return None


class LlamaCppBackend:
    name = "llamacpp"

    def check(self) -> Availability:
        try:
            import gguf  # noqa: F401
        except ImportError:
            return Availability(self.name, False, None, "the gguf package (a dependency) is missing",
                                "pip install gguf")
        version = runtime_version()
        what = "writes model.gguf (Q4_0/Q4_1/Q8_0 blocks of the compress stage's codes; F32/F16/BF16 for floats)"
        if version is None:
            return Availability(self.name, True, None, f"{what}; llama-cpp-python is not installed, so the file is "
                                "written but not run here", INSTALL)
        return Availability(self.name, True, version, f"{what}; validation runs it with llama.cpp's Python "
                            "bindings (llama-cpp-python)")

    def _refuse(self, job: CompileJob, why: str) -> CompileResult:
        """The plan's own backend fails the run; a profile's secondary backend is reported as not run."""
        if job.plan.backend == self.name:
            raise CompileError(f"{job.profile.id} lists llamacpp as its backend, but no GGUF can hold this "
                               f"model: {why}")
        return CompileResult(self.name, "not run", f"no GGUF written: {why}")

    def compile(self, job: CompileJob) -> CompileResult:
        if job.model is None or job.model_kind != "decoder":
            return CompileResult(self.name, "not run", "llama.cpp's GGUF is written for decoder LMs; the encoder "
                                 "ships as the ONNX Runtime artifact")
        why = plan_refusal(job.plan) or model_refusal(job.model.config)
        if why:
            return self._refuse(job, why)
        weights = job.weights if job.weights is not None else job.model.weights
        out = job.model_path.parent / GGUF_FILE
        t0 = time.perf_counter()
        try:
            info = write_gguf(out, job.model, weights, job.plan.precision)
        except CompileError as exc:
            return self._refuse(job, str(exc))
        version = runtime_version()
        types = ", ".join(f"{n} {k}" for k, n in info["tensor_types"].items())
        note = (f"{GGUF_FILE} for llama.cpp's {info['architecture']} graph: {types} tensors, the tokenizer in full "
                f"(pre-tokenizer {info['pre_tokenizer']}); largest change from the measured weights "
                f"{info['max_abs_weight_diff']:.3g}, {info['max_rel_weight_diff']:.2g} of a tensor's largest "
                "weight (fp16 block scales)")
        note += ("; validation runs it with llama-cpp-python " + version if version else
                 "; not run here: llama-cpp-python is not installed (" + INSTALL.split(" (")[0] + ")")
        details = {**info, "write_s": round(time.perf_counter() - t0, 2), "llama_cpp_python": version}
        return CompileResult(self.name, "done", note, (GGUF_FILE,), runtime_model=GGUF_FILE if version else None,
                             details=details)
