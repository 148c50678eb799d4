"""Quantization methods on tiny models and synthetic data: exact properties, not just "it runs"."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from slm_export.calibration.awq import AWQConfig, awq_quantize, search_scale
from slm_export.calibration.compress import CompressConfig, compress
from slm_export.calibration.data import load_calibration
from slm_export.calibration.gptq import GPTQConfig, gptq_quantize
from slm_export.calibration.quant import HotRowsTensor, QuantizedTensor, quantize_rtn
from slm_export.calibration.tune import dequantized_twin
from slm_export.errors import ConfigError
from slm_export.exporters.onnx import OnnxExporter
from slm_export.exporters.quantized import pack_codes
from slm_export.models import load_model
from slm_export.plan import Plan
from slm_export.validation.generate import OnnxDecoder, make_session


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_codes_in_range_and_within_one_step(bits: int, symmetric: bool) -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    q = quantize_rtn(w, bits, 32, symmetric)
    assert q.codes.dtype == np.uint8
    assert q.codes.max() < 2**bits
    assert q.scales.shape == (64, 4)
    step = np.repeat(q.scales, 32, axis=1)
    assert np.all(np.abs(q.dequantize() - w.numpy()) <= step * 0.5 + 1e-6)  # half a step: round to nearest
    assert (q.zeros is None) == symmetric


def test_symmetric_int4_uses_all_sixteen_levels() -> None:
    torch.manual_seed(0)
    w = torch.randn(256, 32)
    q = quantize_rtn(w, 4, 32, True)
    neg_end = (-w.amin(1)) >= w.amax(1) * 8 / 7  # the negative end sets the step: it lands on code 0 (-8)
    amax = w.abs().amax(1).numpy()
    np.testing.assert_allclose(q.scales[neg_end.numpy(), 0], amax[neg_end.numpy()] / 8, rtol=1e-6)
    assert np.all(q.codes[neg_end.numpy()].min(1) == 0)
    assert np.all(q.scales[:, 0] <= amax / 7 + 1e-7)  # never coarser than the 15-level grid
    assert q.codes.max() <= 15
    np.testing.assert_array_less(np.abs(q.dequantize() - w.numpy()), np.repeat(q.scales, 32, 1) * 0.5 + 1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_group_range_never_worse_than_min_max(symmetric: bool) -> None:
    from slm_export.calibration.quant import group_params, quantize_codes, search_group_clip

    g = torch.Generator().manual_seed(3)
    w = torch.randn(256, 32, generator=g)

    def err(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return ((quantize_codes(w, scale, zero, 4) - zero) * scale - w).abs().pow(2.4).sum(1)

    mse, plain = err(*search_group_clip(w, 4, symmetric)), err(*group_params(w, 4, symmetric))
    assert bool((mse <= plain + 1e-6).all())
    assert float(mse.sum()) < 0.95 * float(plain.sum())  # a Gaussian group's tails are worth clipping


@pytest.mark.parametrize("symmetric", [False, True])
def test_weighted_group_range_minimises_the_weighted_error(symmetric: bool) -> None:
    # One hot input channel per group (what AWQ and the Hessian see): its weight's error counts 50x. The
    # weighted search must pick, per group, the range with the least weighted error among the same shrink
    # factors, so it beats the plain search on that measure.
    from slm_export.calibration.quant import quantize_codes, search_group_clip

    g = torch.Generator().manual_seed(5)
    w = torch.randn(512, 32, generator=g)
    importance = torch.ones(512, 32)
    importance[:, 0] = 50.0
    w[:, 0] = 3.0 * torch.sign(w[:, 0])  # the hot weight sits at the group's edge, the one clipping would cut

    def werr(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return (((quantize_codes(w, scale, zero, 4) - zero) * scale - w) ** 2 * importance).sum(1)

    weighted = werr(*search_group_clip(w, 4, symmetric, norm=2.0, importance=importance))
    plain = werr(*search_group_clip(w, 4, symmetric))
    assert bool((weighted <= plain + 1e-6).all())
    assert float(weighted.sum()) < 0.9 * float(plain.sum())


def test_gptq_group_ranges_follow_the_hessian_diagonal() -> None:
    # GPTQ's group ranges come from the Hessian's diagonal: with a few high-energy input channels, the output
    # error tr(D H D^T) is lower than with ranges fitted to the weights alone (the importance dropped).
    from slm_export.calibration import gptq as G

    g = torch.Generator().manual_seed(7)
    x = torch.randn(4096, 128, generator=g)
    x[:, ::16] *= 8.0  # every 16th channel carries most of the energy
    h = x.T @ x
    w = torch.randn(64, 128, generator=g)
    cfg = G.GPTQConfig(4, 32, symmetric=True)

    def out_err(q: QuantizedTensor) -> float:
        d = torch.from_numpy(q.dequantize()) - w
        return float(((d @ h) * d).sum())

    weighted = out_err(G.gptq_quantize(w, h, cfg))
    prep = G.prepare_hessian(h, cfg)
    unweighted = out_err(G.gptq_quantize(w, G.PreparedHessian(prep.perm, prep.hinv, prep.dead,
                                                               torch.ones_like(prep.diag)), cfg))
    assert weighted < 0.97 * unweighted


def test_matmulnbits_packing_shape() -> None:
    q = quantize_rtn(torch.randn(48, 96), 4, 32, False)
    packed = pack_codes(q)
    assert packed.shape == (48, 3, 16)
    assert np.array_equal(packed[0, 0, 0] & 0x0F, q.codes[0, 0])
    assert np.array_equal(packed[0, 0, 0] >> 4, q.codes[0, 1])


def test_group_size_that_does_not_divide_names_valid_sizes() -> None:
    with pytest.raises(ConfigError, match="valid group sizes here: 16, 32, 64"):
        quantize_rtn(torch.randn(8, 576), 4, 128, False)


def _correlated(n: int = 2048, k: int = 128, rank: int = 16) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, rank) @ torch.randn(rank, k)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(act_order: bool) -> None:
    x = _correlated()
    w = torch.randn(64, 128) * 0.1
    ref = x @ w.T
    g = gptq_quantize(w, x.T @ x, GPTQConfig(bits=4, group=32, act_order=act_order))
    r = quantize_rtn(w, 4, 32, False)
    err = lambda q: float(((x @ torch.from_numpy(q.dequantize()).T - ref) ** 2).mean())  # noqa: E731
    assert err(g) < 0.5 * err(r)
    assert g.codes.max() < 16  # same integer grid, groups contiguous in the original order


def test_awq_scale_search_reduces_output_error() -> None:
    torch.manual_seed(2)
    x = torch.randn(1024, 128) * torch.cat([torch.full((8,), 20.0), torch.ones(120)])  # salient channels
    w = torch.randn(64, 128) * 0.1
    cfg = AWQConfig(bits=4, group=32)
    s = search_scale([w], x, x.abs().mean(0), cfg)
    plain = awq_quantize(w, x, cfg).dequantize()
    scaled = awq_quantize(w * s, x / s, cfg).dequantize() / s.numpy()
    ref = (x @ w.T).numpy()
    assert ((x.numpy() @ scaled.T - ref) ** 2).mean() <= ((x.numpy() @ plain.T - ref) ** 2).mean()


def test_calibration_data_errors(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    tok = load_model(str(tiny_models["llama"])).tokenizer
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_calibration(tok, str(empty), 4, 64)
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    with pytest.raises(ConfigError, match="fewer than one sample"):
        load_calibration(tok, str(short), 4, 64)
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_calibration(tok, str(binary), 4, 64)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "x"}\n{"nope": 1}\n')
    with pytest.raises(ConfigError, match='line 2: expected an object with a "text" string'):
        load_calibration(tok, str(jsonl), 4, 64)
    a = load_calibration(tok, None, 4, 64, seed=3)
    b = load_calibration(tok, None, 4, 64, seed=3)
    assert a.sha256 == b.sha256
    assert a.ids.shape == (4, 64)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "awq-gptq"])
@pytest.mark.parametrize("graph_ops", ["onnxruntime", "standard"])
def test_quantized_export_matches_dequantized_torch(method: str, graph_ops: str, tiny_models: dict[str, Path],
                                                    tmp_path: Path) -> None:
    model = load_model(str(tiny_models["llama"]))
    before = {k: v.clone() for k, v in model.weights.items()}
    result = compress(model, CompressConfig("int4", method, 32, calib_samples=4, calib_seqlen=64))
    assert all(torch.equal(before[k], v) for k, v in model.weights.items()), "the float reference was modified"
    q = {k: v for k, v in result.weights.items() if isinstance(v, QuantizedTensor)}
    assert len(q) == 2 * 7
    assert all(e["weight_sqnr_db"] > 5 for e in result.layers)
    plan = Plan(target="host", model="m", out="o", precision="int4", backend="onnxruntime", graph_ops=graph_ops,
                opset=21 if graph_ops == "standard" else 17, static_shapes=False, max_seq_len=512,
                validation="host", accuracy_level=0)
    exported = OnnxExporter().export(model, plan, tmp_path, result.weights)
    graph = onnx.load(str(exported.model_path), load_external_data=False)
    ops = {n.op_type for n in graph.graph.node}
    assert ("MatMulNBits" in ops) == (graph_ops == "onnxruntime")
    # The torch model with the dequantized weights (and AWQ's folded norms) is what the graph computes.
    sd = {k: torch.from_numpy(v.dequantize()) if isinstance(v, QuantizedTensor) else v
          for k, v in result.weights.items()}
    from slm_export.models.loader import build_module

    twin = build_module(type(model)(**{**model.__dict__, "weights": sd, "_module": []}))
    ids = np.asarray([[3, 9, 27, 81, 243, 100]], dtype=np.int64)
    with torch.no_grad():
        ref = twin(torch.from_numpy(ids)).logits.numpy()
    got = OnnxDecoder(make_session(exported.model_path, 1)).logits(ids)
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=1e-3)


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _untied_twin(model: Any, weights: dict[str, Any]) -> torch.nn.Module:
    """The PyTorch model with ``weights`` dequantized, its quantized LM head untied from the embedding (the
    Gather keeps the float table): what an exported graph with a quantized head computes."""
    assert isinstance(weights["lm_head.weight"], QuantizedTensor)
    return dequantized_twin(model, weights)


@pytest.mark.parametrize("head_bits", [4, 8])
def test_quantized_lm_head_of_a_tied_model(head_bits: int, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A tied model's quantized LM head is its own MatMulNBits; the embedding Gather keeps the float table."""
    model = load_model(str(tiny_models["llama"]))
    assert model.config.tie_word_embeddings
    result = compress(model, CompressConfig("int4", "rtn", 32, lm_head_bits=head_bits))
    head = result.weights["lm_head.weight"]
    assert isinstance(head, QuantizedTensor)
    assert head.bits == head_bits
    plan = Plan(target="host", model="m", out="o", precision="int4", backend="onnxruntime", graph_ops="onnxruntime",
                opset=17, static_shapes=False, max_seq_len=512, validation="host", accuracy_level=0)
    exported = OnnxExporter().export(model, plan, tmp_path, result.weights)
    graph = onnx.load(str(exported.model_path), load_external_data=False).graph
    assert [n.attribute for n in graph.node if n.name == "lm_head.qmatmul" and n.op_type == "MatMulNBits"]
    assert not [n for n in graph.node if n.op_type == "Gemm"], "the float table is still multiplied as the head"
    embed = next(t for t in graph.initializer if t.name == "model.embed")
    assert embed.data_type == onnx.TensorProto.FLOAT
    twin = _untied_twin(model, result.weights)
    ids = np.asarray([[3, 9, 27, 81, 243, 100]], dtype=np.int64)
    with torch.no_grad():
        ref = twin(torch.from_numpy(ids)).logits.numpy()
        float_head = twin.model(torch.from_numpy(ids)).last_hidden_state @ model.weights[
            "model.embed_tokens.weight"].T
    got = OnnxDecoder(make_session(exported.model_path, 1)).logits(ids)
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=1e-3)
    assert np.abs(got - float_head.numpy()).max() > 1e-3, "the head was not quantized"
    assert exported.weight_bytes_per_token < OnnxExporter().export(
        model, plan, _mkdir(tmp_path / "f"), {k: v for k, v in result.weights.items() if k != "lm_head.weight"}
    ).weight_bytes_per_token


def test_calibrated_lm_head_beats_round_to_nearest(tiny_models: dict[str, Path]) -> None:
    """With calibration (GPTQ), the int4 head is rounded on the Hessian of its own inputs (the final norm
    of the quantized stack): its logits on held-out text are closer to the float head's than RTN's."""
    from slm_export.models.loader import build_module
    from slm_export.text import builtin_split, token_windows

    model = load_model(str(tiny_models["llama"]))
    result = compress(model, CompressConfig("int4", "gptq", 32, calib_samples=8, calib_seqlen=64, lm_head_bits=4))
    assert any("LM head quantized to int4 (GPTQ" in n for n in result.notes)
    entry = next(e for e in result.layers if e["layer"] == "lm_head")
    assert entry["bits"] == 4
    assert "output_sqnr_db" in entry
    table = model.weights["model.embed_tokens.weight"]
    sd = {k: torch.from_numpy(v.dequantize()) if isinstance(v, QuantizedTensor) else v
          for k, v in result.weights.items() if k != "lm_head.weight"}
    body = build_module(type(model)(**{**model.__dict__, "weights": sd, "_module": []})).model
    ids = torch.tensor(token_windows(model.tokenizer, builtin_split("evaluation"), 4, 64))
    with torch.no_grad():
        h = body(ids).last_hidden_state
    ref = h @ torch.as_tensor(table).T

    def err(q: QuantizedTensor) -> float:
        return float(((h @ torch.from_numpy(q.dequantize()).T - ref) ** 2).mean())

    gptq, rtn = err(result.weights["lm_head.weight"]), err(quantize_rtn(table, 4, 32, False))
    assert gptq < 0.9 * rtn, (gptq, rtn)


@pytest.mark.parametrize("symmetric", [False, True])
def test_awq_lm_head_folds_its_scales_into_the_final_norm(symmetric: bool, tiny_models: dict[str, Path],
                                                          tmp_path: Path) -> None:
    """AWQ methods scale the quantized head's columns by ``s`` and divide the final norm by it: the float
    model is unchanged (the embedding keeps its table), the exported graph computes the folded norm times
    the dequantized head, and the budget's float twin keeps the original norm for its original head."""
    from slm_export.calibration.budget import float_twin, scaled_floats
    from slm_export.models.loader import build_module
    from slm_export.text import builtin_split, token_windows

    model = load_model(str(tiny_models["llama"]))
    cfg = CompressConfig("int4", "awq-gptq", 32, symmetric=symmetric, calib_samples=8, calib_seqlen=64,
                         lm_head_bits=4)
    norm0 = model.weights["model.norm.weight"].clone()
    result = compress(model, cfg)
    s, rows = result.channel_scales["lm_head.weight"]
    assert rows is None
    assert not torch.allclose(s, torch.ones_like(s)), "no scale was searched for the head"
    np.testing.assert_allclose(torch.as_tensor(result.weights["model.norm.weight"]) * s, norm0, rtol=1e-5)
    assert torch.equal(model.weights["model.norm.weight"], norm0), "the float reference was modified"
    table = model.weights["model.embed_tokens.weight"]
    head = result.weights["lm_head.weight"]
    # The folded float head is the original one: W * s read by norm / s.
    sd = {k: torch.from_numpy(v.dequantize()) if isinstance(v, QuantizedTensor) else v
          for k, v in result.weights.items()}
    plan = Plan(target="host", model="m", out="o", precision="int4", backend="onnxruntime", graph_ops="onnxruntime",
                opset=17, static_shapes=False, max_seq_len=512, validation="host", accuracy_level=0)
    exported = OnnxExporter().export(model, plan, tmp_path, result.weights)
    twin = build_module(type(model)(**{**model.__dict__, "weights": sd, "_module": []}))
    twin.lm_head.weight = torch.nn.Parameter(sd["lm_head.weight"])
    twin.model.embed_tokens.weight = torch.nn.Parameter(table.clone())
    ids = np.asarray([[3, 9, 27, 81, 243, 100]], dtype=np.int64)
    with torch.no_grad():
        ref = twin(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(OnnxDecoder(make_session(exported.model_path, 1)).logits(ids), ref,
                               atol=2e-3, rtol=1e-3)
    # On held-out text the scaled head is at least as close to the float head as plain GPTQ's.
    body = {k: v for k, v in sd.items() if k not in ("lm_head.weight", "model.norm.weight")}
    twin_body = build_module(type(model)(**{**model.__dict__, "weights": {**model.weights, **body},
                                             "_module": []})).model
    held = torch.tensor(token_windows(model.tokenizer, builtin_split("evaluation"), 4, 64))
    with torch.no_grad():
        h = twin_body(held).last_hidden_state  # the original final norm's output
    want = h @ table.T
    awq_err = float(((h / s) @ torch.from_numpy(head.dequantize()).T - want).pow(2).mean())
    plain = compress(model, replace(cfg, method="gptq")).weights["lm_head.weight"]
    gptq_err = float((h @ torch.from_numpy(plain.dequantize()).T - want).pow(2).mean())
    assert awq_err <= 1.05 * gptq_err, (awq_err, gptq_err)
    # The budget's float twin (original head, layers as W * s) is the original model: its norm is not folded.
    names = [n for n in result.weights if n.startswith("model.layers.") and isinstance(result.weights[n],
                                                                                        QuantizedTensor)]
    float_w = scaled_floats(model.weights, names, result.channel_scales)
    with torch.no_grad():
        np.testing.assert_allclose(float_twin(model, result.weights, float_w, result.channel_scales)(
            torch.from_numpy(ids)).logits.numpy(), model.torch_module()(torch.from_numpy(ids)).logits.numpy(),
            atol=1e-4)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "unstructured"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_sparsity_patterns_and_ordering(pattern: str, method: str) -> None:
    from slm_export.sparsity import SparsityConfig, prune, satisfies_nm, sparsity_of

    x = _correlated(k=128) + 0.3 * torch.randn(2048, 128)
    w = torch.randn(64, 128) * 0.1
    p = prune(w, SparsityConfig(pattern, method), (x * x).sum(0), x.T @ x)
    nz = (p != 0).numpy()
    assert sparsity_of(nz) == pytest.approx(0.5, abs=0.01)
    if pattern != "unstructured":
        n, m = (int(v) for v in pattern.split(":"))
        assert satisfies_nm(nz, n, m)


def test_sparsegpt_beats_wanda_beats_magnitude_on_output_error() -> None:
    from slm_export.sparsity import SparsityConfig, prune

    torch.manual_seed(3)
    x = (_correlated(k=128) + 0.3 * torch.randn(2048, 128)) * torch.linspace(0.2, 3, 128)
    w = torch.randn(64, 128) * 0.1
    ref = x @ w.T
    err = {m: float(((x @ prune(w, SparsityConfig("2:4", m), (x * x).sum(0), x.T @ x).T - ref) ** 2).mean())
           for m in ("magnitude", "wanda", "sparsegpt")}
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"]


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_sparse_export_keeps_pattern_in_onnx(precision: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from slm_export.sparsity.verify import verify_sparsity

    model = load_model(str(tiny_models["llama"]))
    cfg = CompressConfig("int4" if precision == "int4" else "none", "gptq", 32, calib_samples=4, calib_seqlen=64,
                         sparsity="2:4", sparsity_method="sparsegpt")
    result = compress(model, cfg)
    assert all(e["sparsity"] == pytest.approx(0.5, abs=0.01) for e in result.layers)
    plan = Plan(target="host", model="m", out="o", precision=precision, backend="onnxruntime",
                graph_ops="onnxruntime", opset=17, static_shapes=False, max_seq_len=512, validation="host")
    exported = OnnxExporter().export(model, plan, tmp_path, result.weights)
    check = verify_sparsity(exported.model_path, "2:4")
    assert check["weights_checked"] == 2 * 4  # qkv, o, gate/up, down per layer (merged as exported)
    assert check["all_satisfy_pattern"]
    assert check["mean_sparsity"] == pytest.approx(0.5, abs=0.02)


def test_budget_keeps_the_most_sensitive_groups_at_int8(tiny_models: dict[str, Path]) -> None:
    from slm_export.calibration.budget import mixed_precision
    from slm_export.text import builtin_split, token_windows

    model = load_model(str(tiny_models["llama"]))
    q = compress(model, CompressConfig("int4", "rtn", 32))
    calib = load_calibration(model.tokenizer, None, 2, 128)
    windows = token_windows(model.tokenizer, builtin_split("evaluation"), 2, 128)
    loose = mixed_precision(model, q.weights, 1000.0, calib.ids, windows, 32)
    assert loose.kept_int8 == []
    assert loose.nominal_bits == 4.0
    tight_budget = loose.perplexity_change_pct / 4
    tight = mixed_precision(model, q.weights, tight_budget, calib.ids, windows, 32)
    assert tight.perplexity_change_pct <= tight_budget
    assert 0 < len(tight.kept_int8) <= 8
    assert tight.kept_int8 == [u for u, _ in tight.sensitivity[: len(tight.kept_int8)]]  # most sensitive first
    assert 4.0 < tight.nominal_bits <= 8.0
    assert sum(isinstance(w, QuantizedTensor) and w.bits == 8 for w in tight.weights.values()) > 0


def test_budget_after_awq_requantizes_the_scaled_weights(tiny_models: dict[str, Path]) -> None:
    """AWQ folds 1/s into the norms and quantizes W * s: the budget's int8 groups must be W * s too, or
    the int8 layers no longer match their norms; and they keep the int4 weights' symmetry."""
    from slm_export.calibration.budget import int8_weights, scaled_floats
    from slm_export.models.loader import build_module

    model = load_model(str(tiny_models["llama"]))
    q = compress(model, CompressConfig("int4", "awq", 32, symmetric=True, calib_samples=4, calib_seqlen=64))
    assert len(q.channel_scales) == 2 * 6  # q, k, v, gate, up (columns and rows), down (o_proj: neither)
    names = [n for n, w in q.weights.items() if isinstance(w, QuantizedTensor)]
    float_w = scaled_floats(model.weights, names, q.channel_scales)
    int8 = int8_weights(float_w, q.weights, 32)
    assert all(w.zeros is None and w.bits == 8 for w in int8.values())
    # the scaled floats with the folded norms are the original model, exactly (up to rounding)
    floats = {k: v for k, v in q.weights.items() if not isinstance(v, QuantizedTensor)}
    twin = build_module(type(model)(**{**model.__dict__, "weights": {**model.weights, **floats, **float_w},
                                        "_module": []}))
    ids = torch.tensor([[3, 9, 27, 81, 243, 100]])
    with torch.no_grad():
        np.testing.assert_allclose(twin(ids).logits.numpy(), model.torch_module()(ids).logits.numpy(), atol=1e-4)
    for n, w8 in int8.items():
        step = np.repeat(w8.scales, 32, axis=1)
        assert np.all(np.abs(w8.dequantize() - float_w[n].numpy()) <= step * 0.5 + 1e-6)


@pytest.mark.parametrize("graph_ops", ["onnxruntime", "standard"])
def test_hot_rows_of_an_int4_lm_head(graph_ops: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """--lm-head-hot: the int4 head's rows the calibration text reads most are quantized to int8 as well,
    and the graph writes their logits over the int4 ones: its logits equal the twin whose head is int4 with
    those rows int8, on ORT's fused graph and on the standard one alike."""
    from slm_export.models.loader import build_module

    model = load_model(str(tiny_models["llama"]))
    cfg = CompressConfig("int4", "gptq", 32, calib_samples=8, calib_seqlen=64, lm_head_bits=4, lm_head_hot=0.1)
    result = compress(model, cfg)
    head = result.weights["lm_head.weight"]
    assert isinstance(head, HotRowsTensor)
    assert head.bits == 4
    assert head.hot is not None
    assert head.hot.bits == 8
    calib = load_calibration(model.tokenizer, None, 8, 64)
    counts = np.bincount(calib.ids[:, 1:].reshape(-1), minlength=head.shape[0])
    k = int(np.ceil(0.1 * head.shape[0]))
    assert len(head.rows) == k
    # ranked by next tokens plus the head's probability mass: nearly the tokens of the k most read rows
    assert counts[head.rows].sum() >= 0.9 * np.sort(counts)[-k:].sum()
    assert np.argmax(counts) in head.rows
    entry = next(e for e in result.layers if e["layer"] == "lm_head")
    assert (entry["bits"], entry["hot_rows"], entry["hot_bits"]) == (4, k, 8)
    deq, base = head.dequantize(), head.base.dequantize()
    cold = np.setdiff1d(np.arange(head.shape[0]), head.rows)
    np.testing.assert_array_equal(deq[cold], base[cold])
    table = model.weights["model.embed_tokens.weight"].numpy()
    assert np.abs(deq[head.rows] - table[head.rows]).max() < 0.25 * np.abs(base[head.rows] - table[head.rows]).max()

    plan = Plan(target="host", model="m", out="o", precision="int4", backend="onnxruntime", graph_ops=graph_ops,
                opset=17 if graph_ops == "onnxruntime" else 21, static_shapes=False, max_seq_len=512,
                validation="host", accuracy_level=0)
    exported = OnnxExporter().export(model, plan, tmp_path, result.weights)
    graph = onnx.load(str(exported.model_path), load_external_data=False).graph
    assert [n for n in graph.node if n.op_type == "ScatterElements"]
    sd = {k: torch.from_numpy(v.dequantize()) if isinstance(v, QuantizedTensor) else v
          for k, v in result.weights.items()}
    twin = build_module(type(model)(**{**model.__dict__, "weights": sd, "_module": []}))
    twin.lm_head.weight = torch.nn.Parameter(sd["lm_head.weight"])
    twin.model.embed_tokens.weight = torch.nn.Parameter(model.weights["model.embed_tokens.weight"].clone())
    ids = np.asarray([[3, 9, 27, 81, 243, 100], [5, 6, 7, 8, 9, 10]], dtype=np.int64)
    with torch.no_grad():
        ref = twin(torch.from_numpy(ids)).logits.numpy()
        twin.lm_head.weight = torch.nn.Parameter(torch.from_numpy(base))
        int4_only = twin(torch.from_numpy(ids)).logits.numpy()
    got = OnnxDecoder(make_session(exported.model_path, 1)).logits(ids)
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=1e-3)
    assert np.abs(got - int4_only)[..., head.rows].max() > 1e-2, "the hot rows' int8 logits were not written"


def test_hot_rows_need_an_int4_head_and_onnx_runtime_only() -> None:
    """The option's misuses are refused before any work, and a backend that would read the int4 codes
    alone refuses such a head instead of building a different model."""
    from slm_export.calibration.quant import refuse_hot_rows
    from slm_export.errors import CompileError
    from slm_export.pipeline import make_plan
    from slm_export.targets import get_target

    for bad in ({"lm_head_bits": 8, "lm_head_hot": 0.05}, {"lm_head_bits": 4, "lm_head_hot": 1.0},
                {"lm_head_bits": 4, "lm_head_hot": 0.05, "method": "rtn"}):
        with pytest.raises(ConfigError, match="lm-head-hot"):
            CompressConfig("int4", **{"method": "gptq", **bad})
    with pytest.raises(ConfigError, match="tvm"):
        make_plan(get_target("rpi4b"), "smollm2-135m", "o", "int4", lm_head_bits=4, lm_head_hot=0.05)
    host = make_plan(get_target("host"), "smollm2-135m", "o", "int4")
    assert (host.lm_head_bits, host.lm_head_hot) == (4, 0.15)
    assert make_plan(get_target("host"), "smollm2-135m", "o", "int8").lm_head_bits == 8
    assert make_plan(get_target("rpi4b"), "smollm2-135m", "o", "int4").lm_head_hot == 0
    assert make_plan(get_target("host"), "smollm2-135m", "o", "int4", lm_head_hot=0.1).lm_head_bits == 4
    rtn = make_plan(get_target("host"), "smollm2-135m", "o", "int4", method="rtn")  # no data to pick rows by
    assert (rtn.lm_head_bits, rtn.lm_head_hot) == (8, 0)
    q = quantize_rtn(torch.randn(8, 32), 4, 32, False)
    hot = HotRowsTensor(q.codes, q.scales, q.zeros, 4, 32, rows=np.asarray([1, 5]),
                        hot=quantize_rtn(torch.randn(2, 32), 8, 32, False))
    with pytest.raises(CompileError, match="TVM"):
        refuse_hot_rows(hot, "TVM")


def test_signed_scales_give_the_extra_level_to_the_longer_end() -> None:
    """Symmetric int4 with signed scales: a group whose positive end is the longer takes a negative scale,
    so code 0 (-8 steps) reaches that end; the step is never coarser than the unsigned grid's, and finer
    exactly where the positive end is the longer; nothing is clipped either way."""
    from slm_export.calibration.quant import group_params

    g = torch.Generator().manual_seed(5)
    w = torch.randn(512, 32, generator=g)
    plain, _ = group_params(w, 4, True)
    signed, zero = group_params(w, 4, True, signed=True)
    pos_longer = (w.amax(1) > -w.amin(1)).unsqueeze(1)
    assert bool(pos_longer.any())
    assert bool((~pos_longer).any())
    assert torch.equal(signed < 0, pos_longer)
    assert torch.equal(signed[~pos_longer], plain[~pos_longer])  # negative end longer: the grid as before
    assert bool((signed.abs() <= plain + 1e-9).all())
    assert bool((signed.abs()[pos_longer] < plain[pos_longer]).all())
    pos_sets = w.amax(1) >= -w.amin(1) * 8 / 7  # the positive end sets the step: it lands on code 0
    np.testing.assert_allclose(signed.abs()[pos_sets, 0], w.amax(1)[pos_sets] / 8, rtol=1e-6)
    q = quantize_rtn(w, 4, 32, True, signed=True)
    ends = torch.stack([w.amax(1), -w.amin(1)])
    long_sets = (ends.amax(0) >= ends.amin(0) * 8 / 7).numpy()  # the longer end sets the step: it gets -8
    assert q.signed_scales
    assert q.codes.max() <= 15
    assert np.all(q.codes[long_sets].min(1) == 0)
    step = np.abs(np.repeat(q.scales, 32, axis=1))
    assert np.all(np.abs(q.dequantize() - w.numpy()) <= step * 0.5 + 1e-6)
    err = float(((q.dequantize() - w.numpy()) ** 2).sum())
    assert err < 0.95 * float(((quantize_rtn(w, 4, 32, True).dequantize() - w.numpy()) ** 2).sum())
    # Asymmetric, int8 and the power-of-two grid are unchanged by the option.
    for bits, sym, pow2 in ((4, False, False), (8, True, False), (4, True, True)):
        unsigned_p, signed_p = group_params(w, bits, sym, pow2=pow2), group_params(w, bits, sym, pow2=pow2, signed=True)
        assert all(torch.equal(a, b) for a, b in zip(unsigned_p, signed_p, strict=True))


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq-gptq"])
def test_signed_scales_export_matches_dequantized_torch(method: str, tiny_models: dict[str, Path],
                                                       tmp_path: Path) -> None:
    """ONNX Runtime's MatMulNBits (accuracy level 0: float compute, so the comparison is tight) multiplies by
    the negative scales as stored: the graph computes the dequantized model, head included."""
    model = load_model(str(tiny_models["llama"]))
    cfg = CompressConfig("int4", method, 32, symmetric=True, signed_scales=True, calib_samples=4, calib_seqlen=64,
                         lm_head_bits=4)
    result = compress(model, cfg)
    q = [v for v in result.weights.values() if isinstance(v, QuantizedTensor)]
    assert q
    assert all(v.zeros is None for v in q)
    assert all(v.signed_scales for v in q)
    assert all((v.scales > 0).any() for v in q)
    plan = Plan(target="host", model="m", out="o", precision="int4", backend="onnxruntime", graph_ops="onnxruntime",
                opset=17, static_shapes=False, max_seq_len=512, validation="host", accuracy_level=0)
    exported = OnnxExporter().export(model, plan, tmp_path, result.weights)
    twin = _untied_twin(model, result.weights)
    ids = np.asarray([[3, 9, 27, 81, 243, 100]], dtype=np.int64)
    with torch.no_grad():
        ref = twin(torch.from_numpy(ids)).logits.numpy()
    got = OnnxDecoder(make_session(exported.model_path, 1)).logits(ids)
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=1e-3)


def test_signed_scales_only_where_every_backend_multiplies_by_them() -> None:
    """The plan turns signed scales on for symmetric int4 where every backend of the profile multiplies by
    the scale as stored (ONNX Runtime, TVM), refuses them elsewhere, and ExecuTorch refuses such a tensor."""
    from slm_export.calibration.quant import refuse_signed_scales
    from slm_export.errors import CompileError
    from slm_export.pipeline import make_plan
    from slm_export.targets import get_target

    assert make_plan(get_target("host"), "smollm2-135m", "o", "int4", symmetric=True).signed_scales
    assert make_plan(get_target("rpi4b"), "smollm2-135m", "o", "int4", symmetric=True).signed_scales
    assert not make_plan(get_target("host"), "smollm2-135m", "o", "int4").signed_scales  # asymmetric
    assert not make_plan(get_target("host"), "smollm2-135m", "o", "int8", symmetric=True).signed_scales
    assert not make_plan(get_target("host"), "smollm2-135m", "o", "int4", symmetric=True,
                         signed_scales=False).signed_scales
    android = make_plan(get_target("android-arm64"), "smollm2-135m", "o", "int4")
    assert android.symmetric
    assert not android.signed_scales
    with pytest.raises(ConfigError, match="executorch"):
        make_plan(get_target("android-arm64"), "smollm2-135m", "o", "int4", signed_scales=True)
    with pytest.raises(ConfigError, match="symmetric"):
        CompressConfig("int4", "gptq", signed_scales=True)
    with pytest.raises(CompileError, match="negative"):
        refuse_signed_scales(quantize_rtn(torch.arange(-8.0, 24.0).reshape(1, 32), 4, 32, True, signed=True),
                             "ExecuTorch")
    refuse_signed_scales(quantize_rtn(torch.randn(4, 32), 4, 32, True), "ExecuTorch")  # unsigned: accepted


def _kl_to_float(model: Any, weights: dict[str, Any], windows: list[list[int]]) -> float:
    """Mean KL divergence of the dequantized twin's next-token distributions from the float model's."""
    twin, ref = _untied_twin(model, weights), model.torch_module()
    ids = torch.tensor(windows)
    with torch.no_grad():
        p, q = torch.log_softmax(ref(ids).logits.double(), -1), torch.log_softmax(twin(ids).logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize(("symmetric", "hot"), [(False, 0.1), (True, 0.0)])
def test_end_to_end_tuning_keeps_the_format_and_lowers_the_kl(symmetric: bool, hot: float,
                                                              tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Tuning moves only the norms and the group scales: codes, zero points, scale signs and the hot rows
    stay; the model's KL to the float one falls on its calibration samples and on held-out text; the
    exported graph computes the tuned weights."""
    from slm_export.text import builtin_split, token_windows

    model = load_model(str(tiny_models["llama"]))
    base = CompressConfig("int4", "gptq", 32, symmetric=symmetric, signed_scales=symmetric, calib_samples=8,
                          calib_seqlen=64, lm_head_bits=4, lm_head_hot=hot)
    before = {k: torch.as_tensor(v).clone() for k, v in model.weights.items()}
    plain, tuned = compress(model, base), compress(model, replace(base, tune_epochs=4))
    assert all(torch.equal(before[k], torch.as_tensor(v)) for k, v in model.weights.items()), "the float model moved"
    assert tuned.tuning is not None
    assert tuned.tuning["steps"] == 8
    assert any("tuned end to end" in n for n in tuned.notes)
    quantized = [k for k, v in plain.weights.items() if isinstance(v, QuantizedTensor)]
    assert "lm_head.weight" in quantized
    for k in quantized:
        a, b = plain.weights[k], tuned.weights[k]
        assert type(a) is type(b)
        assert np.array_equal(a.codes, b.codes)
        assert (a.zeros is None and b.zeros is None) or np.array_equal(a.zeros, b.zeros)
        assert np.array_equal(np.sign(a.scales), np.sign(b.scales))
        assert not np.array_equal(a.scales, b.scales), k
        if isinstance(a, HotRowsTensor):
            assert np.array_equal(a.rows, b.rows)
            assert np.array_equal(a.hot.dequantize(), b.hot.dequantize())
    norms = [k for k in plain.weights if k.endswith("norm.weight")]
    assert norms
    assert all(not torch.equal(torch.as_tensor(plain.weights[k]), torch.as_tensor(tuned.weights[k])) for k in norms)
    calib = load_calibration(model.tokenizer, None, 8, 64, 0).ids.tolist()
    held_out = token_windows(model.tokenizer, builtin_split("evaluation"), 8, 64)
    assert _kl_to_float(model, tuned.weights, calib) < 0.9 * _kl_to_float(model, plain.weights, calib)
    assert _kl_to_float(model, tuned.weights, held_out) < _kl_to_float(model, plain.weights, held_out)
    plan = Plan(target="host", model="m", out="o", precision="int4", backend="onnxruntime", graph_ops="onnxruntime",
                opset=17, static_shapes=False, max_seq_len=512, validation="host", accuracy_level=0)
    exported = OnnxExporter().export(model, plan, tmp_path, tuned.weights)
    with torch.no_grad():
        want = _untied_twin(model, tuned.weights)(torch.tensor(held_out[:1])).logits.numpy()
    got = OnnxDecoder(make_session(exported.model_path, 1)).logits(np.asarray(held_out[:1], np.int64))
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)


def test_end_to_end_tuning_refuses_what_it_cannot_tune() -> None:
    from slm_export.pipeline import make_plan
    from slm_export.targets import get_target

    with pytest.raises(ConfigError, match="W8A8"):
        CompressConfig("int8", "smoothquant", tune_epochs=1)
    with pytest.raises(ConfigError, match="between 0 and 100"):
        CompressConfig("int4", "gptq", tune_epochs=-1)
    with pytest.raises(ConfigError, match="int8 or int4"):
        make_plan(get_target("host"), "smollm2-135m", "o", "fp32", tune_epochs=1)
    with pytest.raises(ConfigError, match="do not combine"):
        make_plan(get_target("host"), "smollm2-135m", "o", None, tune_epochs=1, max_ppl_increase=5.0)
    assert make_plan(get_target("host"), "smollm2-135m", "o", "int4", tune_epochs=2).tune_epochs == 2
