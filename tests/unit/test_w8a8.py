"""Observers, SmoothQuant W8A8 static, W8A8 dynamic, power-of-two scales and static-shape graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from slm_export.calibration.compress import CompressConfig, compress
from slm_export.calibration.observers import (
    BINS,
    OBSERVERS,
    fake_quant,
    fake_quant_per_token,
    make_observer,
)
from slm_export.calibration.quant import QuantizedTensor
from slm_export.calibration.rotation import Rotation, block_size, make_rotation
from slm_export.calibration.smoothquant import (
    choose_scales,
    fake_quant_weight,
    quantize_weight,
    simulated_error,
    smooth_scales,
)
from slm_export.errors import ConfigError, UnsupportedByTarget
from slm_export.exporters.onnx import OnnxExporter
from slm_export.models import load_model
from slm_export.pipeline import make_plan
from slm_export.plan import Plan
from slm_export.targets import get_target
from slm_export.validation.generate import OnnxDecoder, make_session, torch_greedy


def _is_pow2(x: float) -> bool:
    return x > 0 and float(np.log2(x)).is_integer()


# ---- observers ---------------------------------------------------------------------------------

def _heavy_tailed(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(4, 64, 32, generator=g) for _ in range(4)]
    batches[2][0, 0, 3] = 60.0  # one outlier among 32k values
    return batches


def test_minmax_and_moving_average_are_exact() -> None:
    xs = _heavy_tailed()
    mm = make_observer("minmax")
    ma = make_observer("moving-average")
    for x in xs:
        mm.update(x)
        ma.update(x)
    lo, hi = mm.range()
    assert float(hi) == 60.0
    assert float(lo) == min(float(x.min()) for x in xs)
    # moving average: first batch, then 1% toward each new batch's extreme
    want = float(xs[0].max())
    for x in xs[1:]:
        want += 0.01 * (float(x.max()) - want)
    assert float(ma.range()[1]) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("name", ["percentile", "entropy"])
def test_histogram_observers_clip_a_lone_outlier(name: str) -> None:
    ob = make_observer(name)
    for x in _heavy_tailed():
        ob.update(x)
    t = float(ob.amax())
    assert 2.0 < t < 30.0, f"{name} threshold {t} should ignore the single 60.0 outlier"
    assert ob.counts.sum() == 4 * 4 * 64 * 32  # the doubling histogram keeps every count


def test_mse_threshold_minimises_the_quantization_error() -> None:
    g = torch.Generator().manual_seed(2)
    xs = [torch.distributions.StudentT(2.0).sample((20000,)) for _ in range(3)]
    ob = make_observer("mse")
    for x in xs:
        ob.update(x)
    data = torch.cat(xs)
    del g

    def err(t: float) -> float:
        return float(((fake_quant(data, t / 127) - data) ** 2).mean())

    t, top = float(ob.amax()), float(data.abs().max())
    assert t < top
    assert err(t) < err(top)
    assert err(t) < err(0.3 * t)
    assert err(t) <= 1.05 * min(err(f * top) for f in
                                                                             np.linspace(0.2, 1, 17))


def test_histogram_grows_by_merging_bins() -> None:
    ob = make_observer("percentile")
    ob.update(torch.full((10,), 1.0))
    w0 = ob.width
    ob.update(torch.full((10,), 3.5))  # beyond the range: doubles twice
    assert ob.width == pytest.approx(4 * w0)
    assert ob.counts.sum() == 20
    assert ob.counts.size == BINS


def test_observer_granularities() -> None:
    x = torch.randn(16, 64)
    x[:, 5] *= 100
    per_ch = make_observer("minmax", "per-channel")
    per_ch.update(x)
    assert per_ch.amax().shape == (64,)
    assert int(per_ch.amax().argmax()) == 5
    per_group = make_observer("minmax", "per-group", group=16)
    per_group.update(x)
    assert per_group.amax().shape == (4,)
    assert torch.allclose(per_group.amax()[0], x[:, :16].abs().max())
    s = make_observer("minmax")
    s.update(x)
    assert _is_pow2(float(s.scale(8, pow2=True)))
    assert float(s.scale(8, pow2=True)) >= float(s.scale(8))


def test_pow2_scale_from_histogram_minimises_error() -> None:
    """Histogram observers choose the power-of-two step by expected error, which may clip a rare
    outlier; min-max never clips. The chosen step's real error on the data is the least of the grid."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(65536, generator=g) / torch.rand(65536, generator=g).clamp_min(1e-3) ** 0.5  # t-like tail
    steps = [2.0 ** k for k in range(-12, 4)]
    real = {st: float(((fake_quant(x, st) - x) ** 2).sum()) for st in steps}
    mse = make_observer("mse")
    mm = make_observer("minmax")
    for ob in (mse, mm):
        ob.update(x.reshape(-1, 64))
    s_mse, s_mm = float(mse.pow2_scale()), float(mm.pow2_scale())
    assert _is_pow2(s_mse)
    assert _is_pow2(s_mm)
    assert s_mm * 127 >= float(x.abs().max()) > s_mm * 127 / 2  # the power of two that clips nothing
    assert s_mse < s_mm  # clips the tail, rounds the bulk finer
    assert real[s_mse] <= 1.05 * min(real.values())
    for name in ("percentile", "entropy"):  # the power of two either side of their own threshold
        ob = make_observer(name)
        ob.update(x.reshape(-1, 64))
        t = float(ob.amax()) / 127
        assert float(ob.pow2_scale()) in (2.0 ** np.floor(np.log2(t)), 2.0 ** np.ceil(np.log2(t)))


def test_pow2_weight_grid_with_gptq() -> None:
    """A per-tensor power-of-two weight grid: the step is chosen by output error, and GPTQ on that
    fixed grid has less output error than rounding to nearest on it."""
    from slm_export.calibration.gptq import GPTQConfig, gptq_quantize
    from slm_export.calibration.quant import quantize_per_tensor
    from slm_export.calibration.smoothquant import pow2_weight_scale

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * 0.05
    w[3, 7] = 2.0  # one outlier sets the min-max range
    x = torch.randn(512, 16, generator=g) @ torch.randn(16, 64, generator=g) + 0.1 * torch.randn(512, 64, generator=g)
    H = x.T @ x
    step = pow2_weight_scale(w, H)
    assert _is_pow2(step)
    assert step < float(quantize_per_tensor(w, 8, pow2=True).scales.flat[0])

    def out_err(deq: torch.Tensor) -> float:
        d = w - deq
        return float(((d @ H) * d).sum())

    cfg = GPTQConfig(8, 64, True, 0.01, True)
    gq = gptq_quantize(w, H, cfg, scale=torch.tensor([[step]]))
    assert np.all(gq.scales == step)
    assert gq.zeros is None
    assert gq.per_tensor
    rtn = torch.clamp(torch.round(w / step), -128, 127) * step
    assert out_err(torch.from_numpy(gq.dequantize())) < 0.8 * out_err(rtn)


def test_observer_errors_name_the_choices() -> None:
    with pytest.raises(ConfigError, match="did you mean 'entropy'"):
        make_observer("entropi")
    with pytest.raises(ConfigError, match="computed at run time"):
        make_observer("minmax", "per-token")
    with pytest.raises(ConfigError, match="supports per-tensor"):
        make_observer("entropy", "per-channel")
    assert set(OBSERVERS) == {"minmax", "moving-average", "percentile", "entropy", "mse"}


def test_fake_quant_per_token_range() -> None:
    x = torch.randn(8, 32) * torch.arange(1, 9).float()[:, None]
    y = fake_quant_per_token(x)
    step = x.abs().amax(1, keepdim=True) / 127
    assert torch.all((y - x).abs() <= step / 2 + 1e-6)
    assert torch.all(fake_quant(torch.tensor([1000.0]), 1.0) == 127)  # saturates like QuantizeLinear


# ---- SmoothQuant --------------------------------------------------------------------------------

def _outlier_inputs(n: int = 512, k: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, k, generator=g)
    x[:, [3, 40]] *= 50.0  # the outlier channels LLM activations have
    w = torch.randn(48, k, generator=g) * 0.05
    return x, w


def test_smoothing_preserves_the_product() -> None:
    x, w = _outlier_inputs()
    s = smooth_scales(x.abs().amax(0), [w], 0.5)
    torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pow2", [False, True])
def test_the_alpha_search_scores_the_weights_the_artifact_stores(pow2: bool) -> None:
    # The search fake-quantizes in torch; the artifact holds quantize_weight's codes. They must not part.
    x, w = _outlier_inputs()
    ws = w * smooth_scales(x.abs().amax(0), [w], 0.5)
    assert torch.equal(fake_quant_weight(ws, pow2), torch.from_numpy(quantize_weight(ws, pow2).dequantize()))


def test_smoothing_reduces_the_w8a8_error_with_outliers() -> None:
    x, w = _outlier_inputs()
    plain = simulated_error(x, [w], torch.ones(x.shape[1]), pow2=False)
    s, alpha = choose_scales(x, x.abs().amax(0), [w], alpha=None, pow2=False)
    assert alpha is not None
    assert simulated_error(x, [w], s, pow2=False) < 0.5 * plain
    with pytest.raises(ConfigError, match="alpha must be in"):
        CompressConfig("int8", "smoothquant", smooth_alpha=1.5)


def test_rotation_is_orthogonal_and_preserves_the_product() -> None:
    rot = make_rotation(384, seed=3, cap=128)
    assert rot.block.shape == (128, 128)
    assert set(rot.signs.tolist()) == {-1.0, 1.0}
    x, w = torch.randn(10, 384), torch.randn(7, 384)
    torch.testing.assert_close(rot.apply(x) @ rot.apply(w).T, x @ w.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rot.apply(x).norm(dim=1), x.norm(dim=1), rtol=1e-5, atol=1e-5)
    assert block_size(1536) == 128
    assert block_size(1536, cap=512) == 512
    assert block_size(96, cap=512) == 32
    spike = torch.zeros(1, 384)
    spike[0, 5] = 100.0  # one outlier channel is spread evenly over its block
    assert rot.apply(spike).abs().amax() == pytest.approx(100.0 / 128 ** 0.5, rel=1e-5)
    with pytest.raises(ConfigError, match="no power-of-two block"):
        block_size(8 * 3)
    with pytest.raises(ConfigError, match="power of two >= 16"):
        CompressConfig("int8", "smoothquant", rotate=24)
    with pytest.raises(ConfigError, match="int8 activations"):
        CompressConfig("int4", "gptq", rotate=64)


def test_rotations_leave_the_float_model_unchanged(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from slm_export.calibration.transforms import rotate_down, rotate_heads
    from slm_export.models.loader import build_module

    model = load_model(str(tiny_models["qwen2"]))  # q/k/v biases: v's is rotated with its rows
    work = build_module(model)
    assert rotate_heads(work, model.config, 0) == 16
    rots = rotate_down(work, CompressConfig("int8", "dynamic", rotate=64), rotate_weights=True)
    assert len(rots) == 2
    for i, layer in enumerate(work.model.layers):
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, r=rots[i]: (r.apply(a[0]),))
    ids = torch.tensor([[3, 9, 27, 81, 243, 100, 7, 1]])
    with torch.no_grad():
        torch.testing.assert_close(work(ids).logits, model.torch_module()(ids).logits, rtol=1e-4, atol=1e-4)


def test_no_rotation_where_no_block_divides(tmp_path: Path) -> None:
    import transformers

    from tests.conftest import _tokenizer, tiny_config

    config = tiny_config("llama")
    config.intermediate_size = 40  # 8 x 5: no power-of-two block of 16
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    _tokenizer(tmp_path / "m")
    result = compress(load_model(str(tmp_path / "m")), CompressConfig("int8", "dynamic", rotate=128))
    assert any("not rotated" in n for n in result.notes)
    assert not any(k.endswith(".rotation.block") for k in result.weights)
    assert sum(isinstance(v, QuantizedTensor) for v in result.weights.values()) == 2 * 7


def _twin(model, weights: dict, hooks: str):  # type: ignore[no-untyped-def]
    """A PyTorch copy computing what the graph should: dequantized weights, int8 activations."""
    from slm_export.models.loader import build_module

    sd = {k: torch.from_numpy(v.dequantize()) if isinstance(v, QuantizedTensor) else v for k, v in weights.items()}
    twin = build_module(type(model)(**{**model.__dict__, "weights": sd, "_module": []}))
    for name, mod in twin.named_modules():
        q = weights.get(name + ".weight")
        if name + ".rotation.signs" in weights:  # registered first: the int8 quantization reads x R
            rot = Rotation(weights[name + ".rotation.signs"], weights[name + ".rotation.block"])
            mod.register_forward_pre_hook(lambda m, a, r=rot: (r.apply(a[0]),))
        if isinstance(q, QuantizedTensor) and hooks == "static":
            mod.register_forward_pre_hook(lambda m, a, s=q.act_scale: (fake_quant(a[0], s),))
        elif isinstance(q, QuantizedTensor) and hooks == "dynamic":
            mod.register_forward_pre_hook(lambda m, a: (fake_quant_per_token(a[0]),))
    return twin


@pytest.mark.parametrize(("method", "pow2", "opset", "rotate", "arch"), [
    ("smoothquant", False, 13, 0, "llama"), ("smoothquant", True, 17, 0, "llama"),
    ("dynamic", False, 13, 0, "llama"), ("smoothquant", False, 13, 32, "llama"),
    ("dynamic", False, 17, 16, "llama"), ("smoothquant", True, 17, 64, "qwen2")])
def test_w8a8_export_matches_simulation(method: str, pow2: bool, opset: int, rotate: int, arch: str,
                                        tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = load_model(str(tiny_models[arch]))
    cfg = CompressConfig("int8", method, calib_samples=4, calib_seqlen=64, pow2_scales=pow2, observer="minmax",
                         rotate=rotate)
    result = compress(model, cfg)
    q = {k: v for k, v in result.weights.items() if isinstance(v, QuantizedTensor)}
    assert len(q) == 2 * 7
    for t in q.values():
        assert t.bits == 8
        assert t.zeros is None
        assert t.activations == ("dynamic" if method == "dynamic" else "static")
        if pow2:
            assert t.per_tensor
            assert _is_pow2(float(t.scales.flat[0]))
            assert _is_pow2(t.act_scale)
    plan = Plan(target="a100", model="m", out="o", precision="int8", backend="tensorrt", graph_ops="standard",
                opset=opset, static_shapes=False, max_seq_len=512, validation="host", method=method)
    exported = OnnxExporter().export(model, plan, tmp_path, result.weights)
    graph = onnx.load(str(exported.model_path))
    ops = [n.op_type for n in graph.graph.node]
    inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    qweights = [v for k, v in inits.items() if k.endswith(".qweight")]
    matmuls = len(qweights)  # per-tensor scales that differ keep q/k/v (gate/up) apart
    assert (2 * 4 < matmuls <= 2 * 7) if pow2 else matmuls == 2 * 4
    assert all(v.dtype == np.int8 for v in qweights)
    if method == "smoothquant":
        assert ops.count("QuantizeLinear") == matmuls
        assert ops.count("DequantizeLinear") == 2 * matmuls
        assert "MatMulInteger" not in ops
        if pow2:  # every Q/DQ scale a scalar power of two
            for n in graph.graph.node:
                if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
                    scale = inits[n.input[1]]
                    assert scale.shape == ()
                    assert _is_pow2(float(scale))
    else:
        assert ops.count("MatMulInteger") == 2 * 4
        assert "QuantizeLinear" not in ops
    blocks = [v for k, v in inits.items() if k.endswith(".rotation.block")]
    assert len(blocks) == (2 if rotate else 0)
    for blk in blocks:  # an orthogonal Hadamard block of the largest power of two <= rotate
        assert blk.shape[0] <= rotate
        np.testing.assert_allclose(blk @ blk.T, np.eye(blk.shape[0]), atol=1e-5)
    ids = np.asarray([[3, 9, 27, 81, 243, 100, 7, 1]], dtype=np.int64)
    with torch.no_grad():
        ref = _twin(model, result.weights, "dynamic" if method == "dynamic" else "static")(
            torch.from_numpy(ids)).logits.numpy()
        flt = model.torch_module()(torch.from_numpy(ids)).logits.numpy()
    got = OnnxDecoder(make_session(exported.model_path, 1, exact_qdq=True)).logits(ids)
    # Same int8 arithmetic: equal up to float rounding and the odd activation rounding at a tie.
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    assert np.abs(got - ref).mean() < 0.1 * np.abs(got - flt).mean() + 1e-5


def test_static_shape_graph(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = load_model(str(tiny_models["llama"]))
    plan = Plan(target="fpga-zcu104", model="m", out="o", precision="fp32", backend="onnxruntime",
                graph_ops="standard", opset=17, static_shapes=True, max_seq_len=32, validation="host")
    exported = OnnxExporter().export(model, plan, tmp_path)
    graph = onnx.load(str(exported.model_path), load_external_data=False)
    for vi in [*graph.graph.input, *graph.graph.output]:
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]
        assert all(isinstance(d, int) and d > 0 for d in dims), (vi.name, dims)
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask", "position_ids"]
    dec = OnnxDecoder(make_session(exported.model_path, 1))
    assert dec.static_len == 32
    ids = np.asarray([[5, 17, 99, 3, 250, 42, 7, 11]], dtype=np.int64)
    with torch.no_grad():
        ref = model.torch_module()(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(dec.logits(ids), ref, atol=2e-4, rtol=1e-3)
    assert dec.generate(ids[0].tolist(), 10)[0] == torch_greedy(model.torch_module(), ids[0].tolist(), 10)
    with pytest.raises(ValueError, match="do not fit"):
        dec.logits(np.ones((1, 40), np.int64))


# ---- plans --------------------------------------------------------------------------------------

def test_plans_pick_w8a8_where_the_target_wants_it(tmp_path: Path) -> None:
    fpga = make_plan(get_target("fpga"), "smollm2-135m", tmp_path / "f")
    assert (fpga.precision, fpga.method, fpga.pow2_scales, fpga.static_shapes) == ("int8", "smoothquant", True, True)
    a100 = make_plan(get_target("a100"), "smollm2-135m", tmp_path / "a", "int8")
    assert (a100.method, a100.pow2_scales) == ("smoothquant", False)
    assert fpga.rotate == a100.rotate == 128  # W8A8 static rotates down_proj's input by default
    assert make_plan(get_target("a100"), "smollm2-135m", tmp_path / "a", "int8", rotate=0).rotate == 0
    # the activation observer comes from the profile unless given
    from slm_export.targets.profile import INT8_OBSERVERS
    assert set(INT8_OBSERVERS) == set(OBSERVERS)
    assert (fpga.observer, a100.observer) == (get_target("fpga").int8_observer, "minmax")
    assert make_plan(get_target("fpga"), "smollm2-135m", tmp_path / "f", observer="entropy").observer == "entropy"
    host = make_plan(get_target("host"), "smollm2-135m", tmp_path / "h", "int8")
    assert host.method == "rtn"
    dyn = make_plan(get_target("host"), "smollm2-135m", tmp_path / "d", "int8", method="dynamic")
    assert (dyn.method, dyn.rotate) == ("dynamic", 0)
    with pytest.raises(ConfigError, match="int8 activations"):
        make_plan(get_target("host"), "smollm2-135m", tmp_path / "x", "int4", rotate=128)
    with pytest.raises(UnsupportedByTarget, match="power-of-two"):
        make_plan(get_target("fpga"), "smollm2-135m", tmp_path / "f2", method="rtn")
    with pytest.raises(ConfigError, match="use --precision int8"):
        make_plan(get_target("host"), "smollm2-135m", tmp_path / "x", "int4", method="smoothquant")
    with pytest.raises(ConfigError, match="unknown observer"):
        make_plan(get_target("a100"), "smollm2-135m", tmp_path / "x", "int8", observer="max")


def test_methods_lists_methods_observers_and_patterns(capsys: pytest.CaptureFixture[str]) -> None:
    from slm_export.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("smoothquant", "dynamic", "gptq", "awq", *OBSERVERS, "per-token", "sparsegpt", "2:4", "hadamard"):
        assert name in out, name
