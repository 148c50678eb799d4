"""Decoder spec -> a functional PyTorch decoder -> Apache TVM Relax -> host and aarch64 shared libraries.

The decoder is rebuilt from the same ``DecoderSpec`` the ONNX exporter reads, with the ONNX graph's
KV-cache interface, so one compiled module serves prefill and decode:

    main(input_ids [B, S] int64, attention_mask [B, S] int64, position_ids [B, S] int64,
         past.{i}.key/value [B, kv_heads, P, head_dim] float32 ..., *params)
      -> (logits [B, S, vocab], present.{i}.key/value [B, kv_heads, P + S, head_dim] ...)

``B``, ``S`` and ``P`` are dynamic (``P`` may be 0). Unlike the ONNX graph, ``attention_mask`` covers only
the ``S`` new tokens: the cache never holds padding, so every past position is attended and the mask
needs no dimension of its own (torch.export cannot express ``total = past + seq`` between inputs).
Positions come in as ``position_ids`` (the research found this the robust form for Relax with dynamic
shapes) and index precomputed rotary tables, the same tables the ONNX graph gathers from.

The module is ``torch_decoder.build_functional_decoder``'s: its linears, attention and gated SiLU are
custom ops that the import turns into the hand-written TIR kernels (``kernels.py``, ``attention.py``),
which read quantized weights as stored and dequantize inside the matmul.

Weights are function parameters of the Relax module, not constants: they go to a separate ``.npz``
next to the library (the ``.so`` holds only code), in the order the compiled function takes them.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slm_export.backends.tvm.ops import convert_map, packs_int4
from slm_export.backends.tvm.schedule import compile_module
from slm_export.backends.tvm.torch_decoder import build_functional_decoder
from slm_export.calibration.quant import QuantizedTensor
from slm_export.errors import CompileError
from slm_export.models.adapters import DecoderSpec

log = logging.getLogger(__name__)

CROSS_CC = "aarch64-linux-gnu-gcc"
HOST_TARGET: dict[str, Any] = {"kind": "llvm"}  # (host_target() adds the CPU where it can)
PARAMS_FORMAT = "slm-export-tvm-params/2"  # 2: int4 codes in pack_int4's 16-column blocks
META_KEY = "__meta__"  # the params file's JSON header (a unicode array: loads without pickle)


def host_target() -> dict[str, Any]:
    """The llvm target of the host library: ``x86-64-v3`` (AVX2, FMA) on an x86 machine whose CPU has those
    (LLVM's generic x86-64 is SSE2 only: a third of the speed), so the library still runs on any such
    machine; else LLVM's default CPU for the host triple."""
    import platform

    if platform.machine().lower() in ("x86_64", "amd64"):
        try:
            flags = {f for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
                     for f in line.split(":", 1)[1].split()}
        except OSError:
            flags = set()
        if {"avx2", "fma", "f16c", "bmi2", "movbe"} <= flags:
            return {**HOST_TARGET, "mcpu": "x86-64-v3"}
    return dict(HOST_TARGET)


def aarch64_target(mcpu: str = "cortex-a72", mattr: tuple[str, ...] = ("+neon",), cores: int = 4) -> dict[str, Any]:
    """The llvm target dict of an aarch64 Linux board (defaults: the Raspberry Pi 4's)."""
    return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu, "mattr": list(mattr), "num-cores": cores}


def weight_storage(spec: DecoderSpec) -> str:
    """How the linear weights are stored in the params file, in words."""
    linears = [w for layer in spec.layers for w in (*layer.qkv, layer.o, *layer.up, layer.down)]
    if spec.lm_head is not None:
        linears.append(spec.lm_head)
    q = [w for w in linears if isinstance(w, QuantizedTensor)]
    if not q:
        return "float32"
    kinds = sorted({(w.bits, w.group, w.zeros is None) for w in q})
    packed = {w.bits for w in q if packs_int4(w.bits, w.shape[1])}
    parts = [f"int{bits} codes {'packed two per byte' if bits in packed else 'one per byte'} (uint8), float32 "
             f"scales per group of {group}, {'symmetric' if sym else 'uint8 zero points'}"
             for bits, group, sym in kinds]
    rest = len(linears) - len(q)
    return "; ".join(parts) + (f"; {rest} linears float32" if rest else "") + "; dequantized inside the matmul kernels"


@dataclass(frozen=True)
class RelaxDecoder:
    """The imported Relax module and its parameters in the order the compiled function takes them."""

    mod: Any  # tvm.IRModule
    params: list[tuple[str, np.ndarray]]
    meta: dict[str, Any]
    export_s: float
    import_s: float


def import_relax(spec: DecoderSpec, max_len: int) -> RelaxDecoder:
    """torch.export the functional decoder (dynamic batch, sequence and past) and import it into Relax
    with the weights kept as function parameters."""
    import torch
    from torch.export import Dim, export
    from tvm.relax.frontend.torch import from_exported_program

    module = build_functional_decoder(spec, max_len)
    n_layers, kv, d = len(spec.layers), spec.kv_heads, spec.head_dim
    # Distinct example sizes (2, 3, 5), none 0 or 1: torch.export specialises those and would tie equal ones.
    b, s, p = 2, 3, 5
    example = (torch.zeros(b, s, dtype=torch.long), torch.ones(b, s, dtype=torch.long),
               torch.arange(p, p + s).repeat(b, 1), [torch.zeros(b, kv, p, d) for _ in range(2 * n_layers)])
    batch, seq = Dim("batch", min=1, max=64), Dim("seq", min=1, max=max_len)
    past = Dim("past", min=0, max=max_len - 1)
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq},
               "position_ids": {0: batch, 1: seq}, "past": [{0: batch, 2: past}] * (2 * n_layers)}
    t0 = time.perf_counter()
    with torch.no_grad():
        ep = export(module, example, dynamic_shapes=dynamic, strict=False).run_decompositions()
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mod = from_exported_program(ep, keep_params_as_input=True, run_ep_decomposition=False,
                                custom_convert_map=convert_map())
    import_s = time.perf_counter() - t0
    # The function's parameters after its user inputs are the lifted weights, named by the export's
    # placeholders: map them back to the module's own tensors rather than trusting an ordering.
    targets = {spec_.arg.name: spec_.target for spec_ in ep.graph_signature.input_specs if spec_.target}
    # a tied head's weight is the embedding: the export may name it either way; the params file says "embed"
    state = dict(module.named_parameters(remove_duplicate=False))
    first = {id(p): n for n, p in module.named_parameters()}
    func = mod["main"]
    n_in = int(func.attrs["num_input"])
    names = [first[id(state[targets[v.name]])] for v in func.params[n_in:]]
    params = [(n, state[n].detach().numpy()) for n in names]
    mod["main"] = _unify_dims(func.without_attr("params"), dynamic)  # (the importer's copy of the weights: dropped)
    meta = {"format": PARAMS_FORMAT, "model_type": spec.model_type, "layers": n_layers, "kv_heads": kv,
            "head_dim": d, "vocab": spec.vocab, "max_len": max_len, "num_input": n_in,
            "inputs": ["input_ids", "attention_mask", "position_ids",
                       *(f"past.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value"))],
            "params": names}
    return RelaxDecoder(mod, params, meta, export_s, import_s)


def _unify_dims(func: Any, dynamic: dict[str, Any]) -> Any:
    """One symbolic variable per ``Dim``: the importer gives each input dimension its own symbol, even
    where torch.export declared the same ``Dim`` (``attention_mask``'s length is ``input_ids``'),
    and then cannot prove that the causal mask and the padding mask broadcast."""
    axes = [(name, spec) for name, spec in dynamic.items() if name != "past"]
    axes += [(f"past_{i}", spec) for i, spec in enumerate(dynamic["past"])]
    params = {p.name: p for p in func.params}
    canonical: dict[str, Any] = {}
    binding: dict[Any, Any] = {}
    for name, spec in axes:
        shape = params[name].ty.shape.values
        for axis, dim in spec.items():
            var = shape[axis]
            first = canonical.setdefault(dim.__name__, var)
            if not var.same_as(first):
                binding[var] = first
    return func.bind_symbolic_vars(binding) if binding else func


def save_params(path: Path, params: list[tuple[str, np.ndarray]], meta: dict[str, Any]) -> None:
    """An uncompressed ``.npz``: ``p0000``... in call order, and the JSON header under ``__meta__``."""
    arrays = {f"p{i:04d}": a for i, (_, a) in enumerate(params)}
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays, **{META_KEY: np.array(json.dumps(meta))})
    tmp.rename(path)


def export_library(executable: Any, path: Path, cc: str | None = None) -> None:
    """Write the executable as a shared library (cross-linked with ``cc`` when given), via a temp name."""
    tmp = path.with_name(path.name + ".partial.so")
    try:
        if cc:
            executable.export_library(str(tmp), cc=cc)
        else:
            executable.export_library(str(tmp))
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise CompileError(f"linking {path.name} failed ({cc or 'host compiler'}): {exc}") from exc
    tmp.rename(path)


def cross_compiler(cc: str = CROSS_CC) -> str | None:
    """``cc``'s version line when it is on PATH and runs, else None."""
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.splitlines()[0] if out.stdout else cc


def elf_info(path: Path) -> dict[str, Any]:
    """Machine (e_machine) and DT_NEEDED libraries of a 64-bit little-endian ELF shared object, read
    directly (no readelf needed)."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a 64-bit little-endian ELF file")
    machine = int.from_bytes(data[18:20], "little")
    shoff = int.from_bytes(data[0x28:0x30], "little")
    shentsize, shnum = (int.from_bytes(data[o:o + 2], "little") for o in (0x3A, 0x3C))
    sections = []
    for i in range(shnum):
        h = data[shoff + i * shentsize: shoff + (i + 1) * shentsize]
        sections.append((int.from_bytes(h[4:8], "little"), int.from_bytes(h[24:32], "little"),
                         int.from_bytes(h[32:40], "little"), int.from_bytes(h[40:44], "little")))
    needed: list[str] = []
    for kind, off, size, link in sections:
        if kind != 6:  # SHT_DYNAMIC; its sh_link is the string table of the names
            continue
        strtab = sections[link][1]
        for j in range(0, size, 16):
            tag, val = int.from_bytes(data[off + j: off + j + 8], "little"), int.from_bytes(
                data[off + j + 8: off + j + 16], "little")
            if tag == 1:  # DT_NEEDED
                end = data.index(b"\0", strtab + val)
                needed.append(data[strtab + val: end].decode())
    return {"e_machine": machine, "needed": needed}


def build_tvm_decoder(spec: DecoderSpec, max_len: int, folder: Path, cross: dict[str, Any] | None,
                      names: dict[str, str], schedule: bool = True) -> dict[str, Any]:
    """Import, compile for the host and (when ``cross`` is a target dict) for aarch64, and write the
    libraries and the params file into ``folder`` under ``names`` (keys ``host``, ``aarch64``,
    ``params``). Returns timings and sizes."""
    relax_mod = import_relax(spec, max_len)
    info: dict[str, Any] = {"torch_export_s": round(relax_mod.export_s, 1),
                            "relax_import_s": round(relax_mod.import_s, 1)}
    host = host_target()
    meta = {**relax_mod.meta, "host_target": host, "aarch64_target": cross, "scheduled": schedule}
    save_params(folder / names["params"], relax_mod.params, meta)
    builds = [("host", host, None)]
    if cross is not None:
        builds.append(("aarch64", cross, CROSS_CC))
    for key, target, cc in builds:
        t0 = time.perf_counter()
        try:
            ex = compile_module(relax_mod.mod, target, schedule)
        except Exception as exc:
            raise CompileError(f"tvm.compile for {json.dumps(target)} failed: {exc}") from exc
        info[f"{key}_compile_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        export_library(ex, folder / names[key], cc)
        info[f"{key}_link_s"] = round(time.perf_counter() - t0, 1)
    info["param_count"] = len(relax_mod.params)
    info["host_target"] = host
    return info
