"""Exported graphs against PyTorch on tiny random models of every supported architecture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from slm_export.exporters.onnx import OnnxExporter
from slm_export.models import load_model
from slm_export.models.adapters import ADAPTERS
from slm_export.plan import Plan
from slm_export.validation.generate import OnnxDecoder, make_session, torch_greedy
from tests.conftest import TINY_DECODERS


def _plan(precision: str = "fp32", opset: int = 17, graph_ops: str = "standard") -> Plan:
    return Plan(target="host", model="tiny", out="x", precision=precision, backend="onnxruntime",
                graph_ops=graph_ops, opset=opset, static_shapes=False, max_seq_len=512, validation="host")


def test_every_adapter_has_a_tiny_model_test() -> None:
    from tests.unit.test_encoders import TINY_ENCODERS

    # the decoder families: tests/unit/test_families.py; the encoders: TINY_ENCODERS (tests/unit/test_encoders.py)
    assert set(ADAPTERS.names()) >= {*TINY_DECODERS, *(config().model_type for _, config in TINY_ENCODERS)}


@pytest.mark.parametrize("arch", TINY_DECODERS)
@pytest.mark.parametrize(("opset", "graph_ops"), [(13, "standard"), (17, "standard"), (17, "onnxruntime")])
def test_decoder_matches_pytorch_with_kv_cache(arch: str, opset: int, graph_ops: str, tiny_models: dict[str, Path],
                                               tmp_path: Path) -> None:
    model = load_model(str(tiny_models[arch]))
    result = OnnxExporter().export(model, _plan(opset=opset, graph_ops=graph_ops), tmp_path)
    graph = onnx.load(str(result.model_path), load_external_data=False)
    if graph_ops == "standard":
        assert {o.domain for o in graph.opset_import} == {""}, "portable graph must use the standard domain only"
        assert all(n.domain == "" for n in graph.graph.node)
    else:  # ONNX Runtime's graph: one fused attention kernel per layer, no attention Softmax left
        layers = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer
        assert sum(n.op_type == "GroupQueryAttention" for n in graph.graph.node) == layers
        assert not [n for n in graph.graph.node if n.op_type == "Softmax"]
    assert (tmp_path / "model.onnx.data").stat().st_size > 0
    dec = OnnxDecoder(make_session(result.model_path, threads=1))
    # the fused graph's cache is one buffer per layer, appended in place (generate below runs that path)
    assert dec.shared_kv == (graph_ops == "onnxruntime")
    ids = np.asarray([[5, 17, 99, 3, 250, 42, 7, 11]], dtype=np.int64)
    with torch.no_grad():
        ref = model.torch_module()(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(dec.logits(ids), ref, atol=2e-4, rtol=1e-3)
    # ORT graphs: logits_to_keep runs the LM head on the last N positions (a prefill needs one); 0: all.
    assert dec.keep_last == (graph_ops == "onnxruntime")
    if dec.keep_last:
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(8)[None],
                **dec._empty_past(1)}
        for keep, rows in ((1, 1), (3, 3), (0, 8), (99, 8)):  # more than the sequence: all of it
            out = dec.session.run(["logits"], {**feed, "logits_to_keep": np.asarray(keep, np.int64)})[0]
            np.testing.assert_allclose(out, ref[:, -rows:], atol=2e-4, rtol=1e-3)
    # Greedy decoding through the KV cache equals PyTorch's generate, token for token.
    expect = torch_greedy(model.torch_module(), ids[0].tolist(), 12)
    got, timing = dec.generate(ids[0].tolist(), 12)
    assert got == expect
    assert len(timing.decode_s) == 11


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("graph_ops", ["standard", "onnxruntime"])
def test_left_padded_batch_matches_unpadded(arch: str, graph_ops: str, tiny_models: dict[str, Path],
                                            tmp_path: Path) -> None:
    model = load_model(str(tiny_models[arch]))
    path = OnnxExporter().export(model, _plan(graph_ops=graph_ops), tmp_path).model_path
    dec = OnnxDecoder(make_session(path, threads=1))
    short = np.asarray([[9, 8, 7, 6]], dtype=np.int64)
    padded = np.asarray([[1, 1, 9, 8, 7, 6]], dtype=np.int64)
    mask = np.asarray([[0, 0, 1, 1, 1, 1]], dtype=np.int64)
    np.testing.assert_allclose(dec.logits(padded, mask)[:, 2:], dec.logits(short), atol=1e-4)


@pytest.mark.parametrize(("precision", "elem"), [("fp16", onnx.TensorProto.FLOAT16),
                                                 ("bf16", onnx.TensorProto.BFLOAT16)])
def test_half_artifact_stores_half_weights(precision: str, elem: int, tiny_models: dict[str, Path],
                                           tmp_path: Path) -> None:
    model = load_model(str(tiny_models["llama"]))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    r32 = OnnxExporter().export(model, _plan("fp32"), tmp_path / "a")
    r16 = OnnxExporter().export(model, _plan(precision), tmp_path / "b")
    assert r16.bytes < 0.6 * r32.bytes
    graph = onnx.load(str(r16.model_path), load_external_data=False)
    big = [t for t in graph.graph.initializer
           if t.data_location == onnx.TensorProto.EXTERNAL and not t.name.startswith("rope.")]
    assert big
    assert all(t.data_type == elem for t in big)
    # every op computes in float32: the only half-width values are the stored weights, upcast at once
    casts = [n for n in graph.graph.node if n.op_type == "Cast"]
    assert len(casts) >= len(big)
    ids = np.asarray([[5, 17, 99, 3]], dtype=np.int64)
    a = OnnxDecoder(make_session(r32.model_path, 1)).logits(ids)
    b = OnnxDecoder(make_session(r16.model_path, 1)).logits(ids)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


def test_encoder_matches_pytorch(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = load_model(str(tiny_models["bert"]))
    result = OnnxExporter().export(model, _plan(), tmp_path)
    sess = make_session(result.model_path, 1)
    ids = np.asarray([[2, 40, 41, 42, 3], [2, 50, 3, 1, 1]], dtype=np.int64)
    mask = (ids != 1).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    hidden, pooled = sess.run(["last_hidden_state", "sentence_embedding"], feed)
    with torch.no_grad():
        ref = model.torch_module()(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
    m = mask[..., None]
    np.testing.assert_allclose(hidden * m, ref * m, atol=1e-4)
    np.testing.assert_allclose(pooled, (ref * m).sum(1) / m.sum(1), atol=1e-4)
