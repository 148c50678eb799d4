"""Apache TVM (Relax): the decoder compiled into a shared library that TVM's runtime loads on the board.

The decoder is rebuilt in PyTorch from the same spec and weights the ONNX exporter used
(``torch_decoder.py``: KV cache as inputs and outputs, dynamic batch, sequence and past),
exported with torch.export, imported with Relax's PyTorch frontend and compiled twice (``build.py``):

- ``tvm_aarch64.so`` for the profile's CPU (``mtriple aarch64-linux-gnu``, its ``llvm_mcpu``/``llvm_mattr``),
  linked with Debian's ``aarch64-linux-gnu-gcc``; it needs only libc, so the board needs just TVM's runtime;
- ``tvm_host.so``, the same module for this machine's CPU, which validation runs here;
- ``tvm_params.npz``, the weights both libraries take as inputs (quantized weights as integer codes and
  scales, dequantized inside the graph), so the libraries hold code only.

There is no tuning: MetaSchedule segfaults in the 0.27 wheel and would need the board itself to
measure on. The libraries use hand-written kernels for the linears (int4 dequantized inside the matmul),
the attention and the gated SiLU (``kernels.py``, ``attention.py``; ``ops.py`` puts them into the
graph), and TVM's default CPU pipeline plus a fixed loop schedule (threads and vector lanes,
``schedule.py``) for the rest, which is what the note and the details say.
"""

from __future__ import annotations

import time
from typing import Any

from slm_export.backends.base import Availability, CompileJob, CompileResult
from slm_export.errors import CompileError

PACKAGE = "apache-tvm==0.27.0.post1"
INSTALL = (f"pip install {PACKAGE} (it pulls apache-tvm-ffi; torch is not touched); for the aarch64 library "
           "also Debian's cross compiler: apt-get install gcc-aarch64-linux-gnu")
HOST_SO = "tvm_host.so"
AARCH64_SO = "tvm_aarch64.so"


def _version() -> str | None:
    try:
        from importlib.metadata import version

        return version("apache-tvm")
    except Exception:
        return None


def _compiler_missing() -> str | None:
    """Why TVM's compiler cannot be used here (runtime-only install), or None."""
    try:
        import tvm
    except Exception as exc:
        return f"tvm does not import: {exc}"
    if getattr(tvm.base, "_RUNTIME_ONLY", False):
        return "only TVM's runtime is loaded (TVM_USE_RUNTIME_LIB=1 or no libtvm_compiler): it cannot compile"
    return None


def unsupported(spec: Any, max_len: int) -> str | None:
    """What of a ``DecoderSpec`` the PyTorch rebuild behind this backend cannot build for ``max_len`` positions,
    in words; None when it builds all of it (``preflight.check_rebuilds`` asks before any work)."""
    from slm_export.backends.tvm.torch_decoder import unsupported as why

    return why(spec, max_len)


class TvmBackend:
    name = "tvm"

    def check(self) -> Availability:
        from slm_export.backends.tvm.build import CROSS_CC, cross_compiler

        version = _version()
        if version is None:
            return Availability(self.name, False, None, "the apache-tvm package is not installed", INSTALL)
        broken = _compiler_missing()
        if broken:
            return Availability(self.name, False, version, broken, INSTALL)
        cc = cross_compiler()
        cross = (f"aarch64 libraries linked with {cc}" if cc else
                 f"{CROSS_CC} not found: aarch64 targets cannot be linked here")
        return Availability(self.name, True, version,
                            f"Relax build of decoders from torch.export (untuned CPU code); host library for "
                            f"validation; {cross}", "" if cc else INSTALL)

    def _refuse(self, job: CompileJob, why: str) -> CompileResult:
        """The plan's own backend fails loudly; a profile's secondary backend is reported as not run."""
        if job.plan.backend == self.name:
            raise CompileError(f"{job.profile.id} uses tvm as its backend, but {why}; install: {INSTALL}")
        return CompileResult(self.name, "not run", f"{why}; install: {INSTALL}")

    def compile(self, job: CompileJob) -> CompileResult:
        plan = job.plan
        if job.model is None or job.model_kind != "decoder":
            return CompileResult(self.name, "not run", "the TVM step builds decoder LMs in this version; the "
                                 "encoder ships as the ONNX Runtime artifact")
        if plan.precision not in ("fp32", "int8", "int4"):
            return CompileResult(self.name, "not run", f"the TVM build takes fp32, int8 or int4 weights in this "
                                 f"version; {plan.precision} ships as the ONNX Runtime artifact")
        weights = job.weights if job.weights is not None else job.model.weights
        if any(getattr(w, "activations", "float") != "float" for w in weights.values()):
            return CompileResult(self.name, "not run", "the TVM build takes weight-only quantization; int8 "
                                 "activations (W8A8) ship as the ONNX Runtime artifact")
        if job.profile.cpu.isa not in ("aarch64", "x86_64"):
            return CompileResult(self.name, "not run", f"the TVM build targets aarch64 and x86_64, not "
                                 f"{job.profile.cpu.isa}")
        version = _version()
        if version is None:
            return self._refuse(job, "the apache-tvm package is not installed")
        broken = _compiler_missing()
        if broken:
            return self._refuse(job, broken)
        from slm_export.backends.tvm import build as td
        from slm_export.models.adapters import spec_for

        cross = None
        cc = None
        if job.profile.cpu.isa == "aarch64":
            cc = td.cross_compiler()
            if cc is None:
                return self._refuse(job, f"{td.CROSS_CC} is not installed, so the aarch64 library cannot be linked")
            cross = td.aarch64_target(job.profile.cpu.llvm_mcpu or "generic", job.profile.cpu.llvm_mattr or (),
                                      job.profile.cpu.cores)
        return self._build(job, spec_for(job.model.config, weights), cross, version, cc)

    def _build(self, job: CompileJob, spec: Any, cross: dict[str, Any] | None, version: str,
               cc: str | None) -> CompileResult:
        from slm_export.backends.tvm import build as td
        from slm_export.runner.tvm_run import PARAMS_FILE

        folder = job.model_path.parent
        names = {"host": HOST_SO, "aarch64": AARCH64_SO, "params": PARAMS_FILE}
        t0 = time.perf_counter()
        info = td.build_tvm_decoder(spec, job.plan.max_seq_len, folder, cross, names)
        seconds = time.perf_counter() - t0
        files = [HOST_SO, PARAMS_FILE] + ([AARCH64_SO] if cross else [])
        sizes = {f: (folder / f).stat().st_size for f in files}
        details: dict[str, Any] = {"build_s": round(seconds, 1), **info, "bytes": sizes,
                                   "max_len": job.plan.max_seq_len,  # (info has the host_target)
                                   "aarch64_target": cross, "tuned": False, "weights": td.weight_storage(spec)}
        what = f"Apache TVM {version} Relax build, dynamic batch/sequence/past with the KV cache as inputs and outputs"
        if cross:
            elf = td.elf_info(folder / AARCH64_SO)
            details["aarch64_elf"] = elf
            what += (f"; {AARCH64_SO} for {cross['mcpu']} ({', '.join(cross['mattr']) or 'no extra features'}), "
                     f"linked with {cc}, needs {', '.join(elf['needed']) or 'no shared library'}")
        what += (f"; {HOST_SO} is the same module for this machine (validation runs it); weights in {PARAMS_FILE} "
                 f"({details['weights']})")
        note = (f"{what}. Untuned: hand-written kernels for the linears, attention and gated SiLU, TVM's default "
                f"CPU pipeline plus a fixed schedule (parallel outer loops, vector lanes) for the rest, no "
                f"MetaSchedule search (it crashes in this wheel and would need the board to measure on)")
        return CompileResult(self.name, "done", note, tuple(files), runtime_model=HOST_SO,
                             device_model=AARCH64_SO if cross else HOST_SO, details=details)

