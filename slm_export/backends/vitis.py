"""Vitis AI for DPU-class FPGA overlays (DPUCZDX8G on Zynq UltraScale+): what runs on the DPU, what not.

The DPU schedules convolutions and fully-connected layers with int8 weights and activations whose
scales are symmetric, per tensor and powers of two; attention (activation-by-activation products),
softmax, normalisation, rotary embedding and the rest run on the board's CPU cores. This step reads
the exported Q/DQ graph op by op:

- a MatMul (or Gemm) whose weight is a constant int8 DequantizeLinear and whose input comes through a
  QuantizeLinear/DequantizeLinear pair is a fully-connected layer for the DPU, when both scales are
  scalar powers of two with zero point 0; otherwise it is named, with the reason, and goes to the CPU;
- every other compute op goes to the CPU; Q/DQ ops themselves are the DPU's int8 boundary.

It writes ``dpu_partition.json`` (each op's side and reason, the DPU/CPU subgraphs in graph order,
multiply-adds per token on each side), ``arch.json`` (the profile's DPU fingerprint, the file the
vendor's compiler takes) and ``compile_dpu.sh`` for the Vitis AI 3.0 docker, the last release for this
family. The compiler (vai_c_xir) takes an xmodel from the vendor's quantizer, not ONNX: the script
says so and takes that xmodel; it is not run here (no Vitis AI on this machine).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from slm_export.backends.base import Availability, CompileJob, CompileResult
from slm_export.errors import CompileError

INSTALL = "the Vitis AI 3.0 docker image (xilinx/vitis-ai-pytorch-cpu:3.0) provides vai_c_xir"
# Ops with no arithmetic worth counting (shape plumbing and the int8 boundary).
_PLUMBING = {"Shape", "Gather", "Reshape", "Unsqueeze", "Squeeze", "Concat", "Slice", "Transpose", "Cast",
             "Constant", "ConstantOfShape", "Range", "Identity", "Expand", "QuantizeLinear", "DequantizeLinear",
             "Less", "LessOrEqual", "Equal", "Where", "Not", "And", "Sub", "Flatten"}


def _pow2(x: float) -> bool:
    return x > 0 and math.log2(x).is_integer()


class _Graph:
    """Producers, constant values and inferred shapes of an ONNX graph (weights not loaded)."""

    def __init__(self, path: Path) -> None:
        import onnx
        from onnx import numpy_helper, shape_inference

        model = onnx.load(str(path), load_external_data=False)
        inferred = shape_inference.infer_shapes(model)
        self.nodes = list(model.graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.inits = {i.name: i for i in model.graph.initializer}
        self.small: dict[str, np.ndarray] = {}
        for name, t in self.inits.items():
            if not t.external_data and np.prod(t.dims) <= 16:
                self.small[name] = numpy_helper.to_array(t)
        for n in self.nodes:  # scalar Constant nodes
            if n.op_type == "Constant" and n.attribute and n.attribute[0].t.dims == []:
                self.small[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.shapes: dict[str, list[int | None]] = {}
        for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            dims = vi.type.tensor_type.shape.dim
            self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        for name, t in self.inits.items():
            self.shapes[name] = list(t.dims)

    def scalar(self, name: str) -> float | None:
        v = self.small.get(name)
        return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None


def _dq_check(g: _Graph, dq: Any, what: str) -> str | None:
    """Why a DequantizeLinear is not DPU-form (None when it is): int8, scalar pow2 scale, zero point 0."""
    scale = g.scalar(dq.input[1])
    if scale is None:
        return f"{what} scale is not a single per-tensor value"
    if not _pow2(scale):
        return f"{what} scale {scale:g} is not a power of two"
    if len(dq.input) > 2 and dq.input[2]:
        zp = g.scalar(dq.input[2])
        if zp not in (0, 0.0, None):
            return f"{what} zero point {zp:g} is not 0 (the DPU is symmetric)"
    return None


def _constant(g: _Graph, name: str, depth: int = 0) -> bool:
    """Whether a tensor is computed from initializers alone (a weight, possibly transposed or cast)."""
    if name in g.inits:
        return True
    node = g.producer.get(name)
    if node is None or depth > 8:
        return False
    if node.op_type == "Constant":
        return True
    return all(_constant(g, x, depth + 1) for x in node.input if x)


def _classify_matmul(g: _Graph, node: Any) -> tuple[str, str]:
    """("dpu", "fully-connected ...") or ("cpu", reason) for a MatMul/Gemm."""
    a, b = (g.producer.get(x) for x in node.input[:2])
    if b is None or b.op_type != "DequantizeLinear" or b.input[0] not in g.inits:
        kind = "float weight (not quantized)" if _constant(g, node.input[1]) else \
            "activation x activation (attention)"
        return "cpu", f"{kind}: the DPU multiplies activations only by constant int8 weights"
    if a is None or a.op_type != "DequantizeLinear" or g.producer.get(a.input[0]) is None \
            or g.producer[a.input[0]].op_type != "QuantizeLinear":
        return "cpu", "input not quantized to int8 (no QuantizeLinear/DequantizeLinear pair)"
    for dq, what in ((b, "weight"), (a, "activation")):
        why = _dq_check(g, dq, what)
        if why:
            return "cpu", why
    return "dpu", "fully-connected: int8 weight x int8 activation, power-of-two per-tensor scales"


def _macs(g: _Graph, node: Any) -> int:
    """Multiply-adds of one op for one pass at the graph's shapes (matmuls exactly; elementwise ops by size)."""
    if node.op_type in ("MatMul", "Gemm"):
        sa, sb = g.shapes.get(node.input[0]), g.shapes.get(node.input[1])
        so = g.shapes.get(node.output[0])
        if sa and sb and so and None not in sa + sb + so:
            return int(np.prod(so)) * int(sa[-1])  # every output element: K multiply-adds
        return 0
    so = g.shapes.get(node.output[0])
    return int(np.prod(so)) if so and None not in so else 0


def partition(model_path: Path, seq: int) -> dict[str, Any]:
    """Each op's side (dpu/cpu) with its reason, the subgraphs in graph order and each side's share."""
    g = _Graph(model_path)
    ops, subgraphs = [], []
    totals = {"dpu": 0, "cpu": 0}
    for node in g.nodes:
        if node.op_type in _PLUMBING:
            continue
        if node.op_type in ("MatMul", "Gemm"):
            side, why = _classify_matmul(g, node)
        else:
            side, why = "cpu", f"{node.op_type} is not a DPUCZDX8G operator for this graph (CPU cores)"
        macs = _macs(g, node)
        totals[side] += macs
        ops.append({"name": node.name or node.output[0], "op": node.op_type, "side": side, "reason": why,
                    "macs": macs})
        if subgraphs and subgraphs[-1]["side"] == side:
            subgraphs[-1]["ops"] += 1
            subgraphs[-1]["macs"] += macs
        else:
            subgraphs.append({"side": side, "ops": 1, "macs": macs})
    total = max(sum(totals.values()), 1)
    return {
        "tokens": seq,
        "ops": ops,
        "subgraphs": subgraphs,
        "dpu_ops": sum(o["side"] == "dpu" for o in ops),
        "cpu_ops": sum(o["side"] == "cpu" for o in ops),
        "dpu_macs": totals["dpu"], "cpu_macs": totals["cpu"],
        "dpu_share": round(totals["dpu"] / total, 4), "cpu_share": round(totals["cpu"] / total, 4),
        "transfers": max(len(subgraphs) - 1, 0),
        # int8 linear layers the DPU cannot take (float ones, the rotation and a float LM head, are CPU by design)
        "fully_connected_refused": [o for o in ops if o["op"] in ("MatMul", "Gemm") and o["side"] == "cpu"
                                    and not o["reason"].startswith(("activation x activation", "float weight"))],
    }


def _script(fingerprint: str, name: str) -> str:
    return "\n".join([
        "#!/bin/sh",
        f"# Compile the DPU part for {name} inside the Vitis AI 3.0 docker (the last release for Zynq",
        "# UltraScale+). vai_c_xir reads an xmodel from Vitis AI's own quantizer, not ONNX: quantize the same",
        "# float model with vai_q_pytorch using the power-of-two positions listed in dpu_partition.json",
        "# (fix position = -log2(scale)), export it as XMODEL, and pass that file as $1.",
        "set -eu",
        'cd "$(dirname "$0")"',
        'XMODEL="${1:?usage: compile_dpu.sh QUANTIZED.xmodel (from vai_q_pytorch --quant_mode test --deploy)}"',
        f"# arch.json carries the DPU fingerprint {fingerprint}; check the board with: xdputil query",
        'vai_c_xir -x "$XMODEL" -a arch.json -o dpu -n model',
        "",
    ])


class VitisAIBackend:
    name = "vitis-ai"

    def check(self) -> Availability:
        tool = shutil.which("vai_c_xir")
        if tool:
            return Availability(self.name, True, None, f"vai_c_xir at {tool}")
        return Availability(self.name, False, None, "vai_c_xir (the DPU compiler) is not on PATH: writes the "
                            "DPU/CPU partition, arch.json and compile_dpu.sh, compiles nothing", INSTALL)

    def compile(self, job: CompileJob) -> CompileResult:
        if job.plan.precision != "int8":
            raise CompileError(f"the DPU runs int8 only; this plan is {job.plan.precision}")
        folder = job.model_path.parent
        seq = job.plan.max_seq_len if job.plan.static_shapes else 1
        part = partition(job.model_path, seq)
        if part["fully_connected_refused"]:
            first = part["fully_connected_refused"][0]
            raise CompileError(f"{len(part['fully_connected_refused'])} linear layer(s) cannot go to the DPU; "
                               f"first: {first['name']}: {first['reason']}")
        fingerprint = job.profile.gpu.dpu_fingerprint if job.profile.gpu else None
        if not fingerprint:
            raise CompileError(f"{job.profile.id} names no DPU fingerprint ([gpu] dpu_fingerprint)")
        (folder / "dpu_partition.json").write_text(json.dumps(part, indent=1) + "\n")
        (folder / "arch.json").write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
        script = folder / "compile_dpu.sh"
        script.write_text(_script(fingerprint, job.profile.name))
        script.chmod(0o755)
        summary = {k: part[k] for k in ("tokens", "dpu_ops", "cpu_ops", "dpu_macs", "cpu_macs", "dpu_share",
                                        "cpu_share", "transfers")}
        note = (f"{part['dpu_ops']} fully-connected layers to the DPU ({part['dpu_share']:.1%} of multiply-adds "
                f"for {seq} tokens), {part['cpu_ops']} ops on the CPU cores, {part['transfers']} DPU/CPU "
                "hand-overs; DPU compile not run here")
        if self.check().usable:
            note = note.replace("DPU compile not run here", "vai_c_xir present: run compile_dpu.sh with the "
                                "vendor-quantized xmodel")
        return CompileResult(self.name, "not run", note, ("dpu_partition.json", "arch.json", "compile_dpu.sh"),
                             details=summary)
