"""Check a sparsity pattern in an exported graph's weights, after quantization too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from slm_export.sparsity.masks import parse_pattern, satisfies_nm, sparsity_of


def _nonzero_out_in(init: onnx.TensorProto, arrays: dict[str, np.ndarray], node: onnx.NodeProto | None) -> np.ndarray:
    """Non-zero mask of a linear weight as [out, in], whatever form the graph stores it in."""
    arr = arrays[init.name]
    if node is not None and node.op_type == "MatMulNBits":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        n, k, bits = attrs["N"], attrs["K"], attrs.get("bits", 4)
        raw = arr.reshape(n, -1)
        codes = np.stack([raw & 0x0F, raw >> 4], -1).reshape(n, -1)[:, :k] if bits == 4 else raw[:, :k]
        nb = k // attrs["block_size"]
        zeros = np.full((n, nb), 1 << (bits - 1), np.uint8)
        if len(node.input) > 3 and node.input[3]:
            z = arrays[node.input[3]].reshape(n, -1)
            zeros = (np.stack([z & 0x0F, z >> 4], -1).reshape(n, -1)[:, :nb] if bits == 4 else z[:, :nb])
        return codes != np.repeat(zeros, attrs["block_size"], axis=1)
    return arr.T != 0  # float MatMul weights are stored [in, out]


def verify_sparsity(model_path: Path, pattern: str) -> dict[str, Any]:
    """Per linear weight: its sparsity and whether it keeps ``pattern`` along the reduction axis."""
    model = onnx.load(str(model_path))
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    consumers = {i: n for n in model.graph.node for i in n.input}
    nm = parse_pattern(pattern)
    layers = {}
    for init in model.graph.initializer:
        name = init.name
        if not (name.endswith(".qweight") or (name.startswith("layers.") and name.endswith(".weight")
                                               and "norm" not in name)):
            continue
        nonzero = _nonzero_out_in(init, arrays, consumers.get(name))
        if nonzero.ndim != 2:
            continue
        layers[name] = {"sparsity": round(sparsity_of(nonzero), 4),
                        "pattern_ok": satisfies_nm(nonzero, *nm) if nm else True}
    ok = bool(layers) and all(v["pattern_ok"] for v in layers.values())
    return {"pattern": pattern, "weights_checked": len(layers), "all_satisfy_pattern": ok,
            "mean_sparsity": round(float(np.mean([v["sparsity"] for v in layers.values()])), 4) if layers else 0.0}
