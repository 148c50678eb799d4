"""An artifact with the exported and the optimized graph stores each weight once (``backends/shared_data.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from slm_export.backends.shared_data import share_weights


def _graph(path: Path, weights: dict[str, np.ndarray]) -> None:
    """y = x @ a @ b ... over the weights, saved with every tensor in ``<name>.data``."""
    nodes, prev = [], "x"
    for i, name in enumerate(weights):
        out = "y" if i == len(weights) - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, name], [out]))
        prev = out
    n = next(iter(weights.values())).shape[0]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(w, k) for k, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_equal_tensors_are_read_from_the_exported_file_and_the_others_kept(tmp_path: Path) -> None:
    g = np.random.default_rng(0)
    a, b, c = (g.standard_normal((16, 16)).astype(np.float32) for _ in range(3))
    _graph(tmp_path / "model.onnx", {"a": a, "b": b})
    _graph(tmp_path / "model.optimized.onnx", {"a2": a, "c": c, "b2": b})  # c: made by the optimizations
    x = g.standard_normal((1, 16)).astype(np.float32)
    before = _run(tmp_path / "model.optimized.onnx", x)
    saved, own = share_weights(tmp_path / "model.onnx", tmp_path / "model.optimized.onnx")
    assert saved == a.nbytes + b.nbytes
    assert own
    assert (tmp_path / "model.optimized.onnx.data").stat().st_size < 2 * c.nbytes  # c alone (and its alignment)
    np.testing.assert_array_equal(_run(tmp_path / "model.optimized.onnx", x), before)
    np.testing.assert_array_equal(_run(tmp_path / "model.onnx", x), x @ a @ b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data", "model.optimized.onnx",
                                                          "model.optimized.onnx.data"]


def test_a_graph_sharing_every_weight_keeps_no_data_file(tmp_path: Path) -> None:
    g = np.random.default_rng(1)
    a, b = (g.standard_normal((8, 8)).astype(np.float32) for _ in range(2))
    _graph(tmp_path / "model.onnx", {"a": a, "b": b})
    _graph(tmp_path / "model.optimized.onnx", {"a": a, "b": b})
    x = g.standard_normal((1, 8)).astype(np.float32)
    assert share_weights(tmp_path / "model.onnx", tmp_path / "model.optimized.onnx") == (a.nbytes + b.nbytes, False)
    assert not (tmp_path / "model.optimized.onnx.data").exists()
    np.testing.assert_allclose(_run(tmp_path / "model.optimized.onnx", x), x @ a @ b, rtol=1e-5)
