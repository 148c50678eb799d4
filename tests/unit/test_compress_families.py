"""The compress stage on every decoder family of tests/families.py: the traits' scale folds are exact (and the
folds they leave out are not), each layer is calibrated with its own arguments, and RTN, AWQ+GPTQ and W8A8 give
quantized weights for every linear whose fake-quantized model stays near the float one."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from slm_export.calibration.compress import CompressConfig, compress, linear_twins
from slm_export.calibration.observers import fake_quant
from slm_export.calibration.quant import QuantizedTensor
from slm_export.calibration.rotation import Rotation
from slm_export.calibration.sequential import (
    capture_layer_inputs,
    decoder_layers,
    run_layer,
    sequential_calibration,
    submodule,
    traits_of,
)
from slm_export.calibration.transforms import awq_layer, fold_scales, input_groups, smooth_layer
from slm_export.models.loader import LoadedModel, build_module
from slm_export.models.traits import ArchTraits, traits_for
from tests.families import FAMILIES, VARIANTS, WINDOW, family_config

ALL = [*FAMILIES, *VARIANTS]


@cache
def _tokenizer() -> Any:
    import tempfile

    from tests.conftest import _tokenizer as train

    with tempfile.TemporaryDirectory() as folder:  # the trained tokenizer lives in memory; its files can go
        return train(Path(folder))


@cache
def text_ids() -> torch.Tensor:
    """Two 12-token windows of the built-in text (windows of 4 bite), drawn apart from the calibration samples:
    static int8 activation scales are calibrated for text, not for random token ids."""
    from slm_export.calibration.data import load_calibration

    return torch.from_numpy(load_calibration(_tokenizer(), None, 2, 12, seed=7).ids.astype("int64"))


def family_model(name: str) -> LoadedModel:
    """The family's seeded random model (as ``make_family_model`` builds it), loaded in memory, with its norms'
    weights and every bias moved off their initial ones and zeros, so that a fold forgetting a bias or an offset
    changes the function."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    module = AutoModelForCausalLM.from_config(family_config(name)).eval()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if n.endswith(".bias") or (p.dim() == 1 and ("norm" in n or ".ln_" in n)):
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return LoadedModel(name, name, "hf", "decoder", module.config, _tokenizer(), dict(module.state_dict()),
                       "test", [module])


def work_module(model: LoadedModel, traits: ArchTraits) -> nn.Module:
    """The compress stage's second module over the model's tensors (GPT-2's Conv1D as nn.Linear twins)."""
    work = build_module(model)
    if traits.conv1d:
        assert linear_twins(work, traits)
    return work


def logits(module: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return module(text_ids()).logits


def layer_modules(model: LoadedModel, traits: ArchTraits) -> dict[str, nn.Module]:
    """Every linear (Conv1D included) in the decoder layers, by its full name."""
    from transformers.pytorch_utils import Conv1D

    out = {}
    for i, layer in enumerate(decoder_layers(model.torch_module())):
        out.update({f"{traits.layers}.{i}.{n}": m for n, m in layer.named_modules()
                    if isinstance(m, nn.Linear | Conv1D)})
    return out


@pytest.mark.parametrize("name", ALL)
def test_traits_name_modules_the_model_has(name: str) -> None:
    model = family_model(name)
    traits = traits_for(model.model_type, model.config)
    assert traits == traits_of(model.torch_module())
    layer = decoder_layers(model.torch_module())[0]
    named = {p for p, readers in traits.scale_groups + traits.projection_groups for p in (p, *readers)}
    named -= {g for g, _ in traits.projection_groups}  # projection groups' own names are labels
    for path in named | {traits.down_proj, traits.v_proj, traits.o_proj} - {None}:
        assert submodule(layer, path) is not None, path
    prefix = f"{traits.layers}.0."
    linears = {n[len(prefix):] for n in layer_modules(model, traits) if n.startswith(prefix)}
    grouped = {m for _, members in traits.projection_groups for m in members}
    assert not traits.projection_groups or grouped == linears  # the budget's groups cover every linear once
    top = model.torch_module()
    assert traits.embed in model.weights
    assert traits.lm_head in model.weights
    assert submodule(top, traits.final_norm) is not None or submodule(top, traits.head_proj) is not None


def _random_folds(work: nn.Module, traits: ArchTraits, groups: Any) -> int:
    """Fold a random positive per-channel scale (0.25 to 4) into each of ``groups`` in every layer; the count."""
    gen = torch.Generator().manual_seed(2)
    n = 0
    for layer in decoder_layers(work):
        for prev, readers in groups:
            lins = [layer.get_submodule(r) for r in readers]
            s = torch.exp2(torch.rand(lins[0].weight.shape[1], generator=gen) * 4 - 2)
            fold_scales(layer.get_submodule(prev), lins, s, traits.norm_offset)
            n += 1
    return n


@pytest.mark.parametrize("name", ALL)
def test_the_traits_folds_keep_the_function(name: str) -> None:
    model = family_model(name)
    traits = traits_for(model.model_type, model.config)
    assert traits.scale_groups, f"{name}: every family folds somewhere"
    work = work_module(model, traits)
    before = {k: v.clone() for k, v in work.state_dict().items()}
    assert _random_folds(work, traits, traits.scale_groups) == len(traits.scale_groups) * len(decoder_layers(work))
    changed = [k for k, v in work.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    ref = logits(model.torch_module())
    torch.testing.assert_close(logits(work), ref, atol=1e-4, rtol=1e-4)


# Folds the traits leave out on purpose: the norm or linear does not feed only those linears, or a non-linearity
# that does not commute with a scale sits between. Each must change the logits, or leaving it out proves nothing.
NOT_EXACT = {
    "olmo2": ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),  # a post-norm: gate/up read the stream
    "gemma2": ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    "gemma3_text": ("post_feedforward_layernorm", ("self_attn.q_proj",)),
    "opt-350m-style": ("self_attn_layer_norm", ("fc1",)),  # post-LN: the norm's output is the residual too
    "phi": ("mlp.fc1", ("mlp.fc2",)),  # GELU between
    "gpt_neox": ("mlp.dense_h_to_4h", ("mlp.dense_4h_to_h",)),
    "phi3": ("mlp.gate_up_proj", ("mlp.down_proj",)),  # the gate half takes 1/s too
}


@pytest.mark.parametrize("name", sorted(NOT_EXACT))
def test_the_folds_left_out_would_change_the_function(name: str) -> None:
    model = family_model(name)
    traits = traits_for(model.model_type, model.config)
    prev, readers = NOT_EXACT[name]
    assert all(g[0] != prev or set(readers) - set(g[1]) for g in traits.scale_groups)
    work = work_module(model, traits)
    if prev == "mlp.gate_up_proj":  # the shapes differ: scale all rows, as a fold into the whole linear would
        for layer in decoder_layers(work):
            gu = layer.mlp.gate_up_proj
            gu.weight = nn.Parameter(gu.weight.detach() / 3.0, requires_grad=False)
            layer.mlp.down_proj.weight = nn.Parameter(layer.mlp.down_proj.weight.detach() * 3.0, requires_grad=False)
    else:
        _random_folds(work, traits, [(prev, readers)])
    assert (logits(work) - logits(model.torch_module())).abs().max() > 1e-2


@pytest.mark.parametrize("method", ["awq-gptq", "smoothquant"])
@pytest.mark.parametrize("name", ALL)
def test_searched_scales_fold_without_changing_the_function(name: str, method: str) -> None:
    # The methods' own searches over calibration statistics, folded and not rounded: the float model is kept.
    model = family_model(name)
    traits = traits_for(model.model_type, model.config)
    cfg = CompressConfig("int8" if method == "smoothquant" else "int4", method, 32)
    work = work_module(model, traits)
    seen: list[int] = []

    def step(i: int, layer: nn.Module, stats: dict, inputs: list) -> None:
        if method == "smoothquant":
            seen.append(len(smooth_layer(layer, stats, cfg, traits)))
        else:
            seen.append(len(awq_layer(layer, stats, cfg, traits, f"{traits.layers}.{i}")))

    batches = [torch.randint(2, 384, (2, 32), generator=torch.Generator().manual_seed(3))]
    sequential_calibration(work, batches, step, want_hessian=False)
    assert len(seen) == len(decoder_layers(work))
    assert all(seen)  # every layer folded at least one group
    torch.testing.assert_close(logits(work), logits(model.torch_module()), atol=1e-4, rtol=1e-4)


def test_input_groups_leave_out_a_norm_without_weights() -> None:
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(**{**FAMILIES["opt"][1], "layer_norm_elementwise_affine": False})
    layer = OPTForCausalLM(config).model.decoder.layers[0]
    groups = input_groups(layer, traits_for("opt", config))
    assert [key for _, _, key in groups] == ["fc2"]  # only fc1 -> fc2 (ReLU) is left to fold into


@pytest.mark.parametrize("name", ["qwen2", "gemma2", "gemma3_text"])
def test_each_layer_is_calibrated_with_its_own_arguments(name: str) -> None:
    module = family_model(name).torch_module()
    first, per_layer = capture_layer_inputs(module, [text_ids()])
    sliding, full = per_layer[1 if name == "qwen2" else 0][0], per_layer[0 if name == "qwen2" else 1][0]
    assert set(sliding) == set(full)
    differ = [k for k in full if not _same(sliding[k], full[k])]
    assert "attention_mask" in differ
    if name == "gemma3_text":
        assert "position_embeddings" in differ  # local and global rotary bases
    assert text_ids().shape[1] > WINDOW

    def replay(kwargs_of: Any) -> torch.Tensor:
        hidden = [(first[0], {})]
        for i, layer in enumerate(decoder_layers(module)):
            hidden = run_layer(layer, [(hidden[0][0], kwargs_of(i))])
        return hidden[0][0]

    tail = module.model.norm
    got: list[torch.Tensor] = []
    hook = tail.register_forward_pre_hook(lambda m, a: got.append(a[0]))
    logits(module)
    hook.remove()
    torch.testing.assert_close(replay(lambda i: per_layer[i][0]), got[0], atol=0, rtol=0)
    # layer 0's arguments for every layer (what the stage did before) computes another function
    assert (replay(lambda i: per_layer[0][0]) - got[0]).abs().max() > 1e-3


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a is b or a == b


@pytest.mark.parametrize("name", ALL)
def test_every_layer_gets_the_arguments_the_model_gives_it(name: str) -> None:
    # The stage's layer-by-layer pass over an unchanged model ends on the model's own last hidden state, exactly.
    module = family_model(name).torch_module()
    traits = traits_of(module)
    out: list[torch.Tensor] = []
    steps: list[int] = []
    sequential_calibration(module, [text_ids()], lambda i, layer, stats, inputs: steps.append(i), want_hessian=False,
                           final=lambda hidden: out.extend(h for h, _ in hidden))
    assert steps == list(range(len(decoder_layers(module))))
    tail = submodule(module, traits.final_norm) or submodule(module, traits.head_proj)
    got: list[torch.Tensor] = []
    hook = tail.register_forward_pre_hook(lambda m, a: got.append(a[0]))
    logits(module)
    hook.remove()
    torch.testing.assert_close(out[0], got[0], atol=0, rtol=0)


def fake_quantized(model: LoadedModel, weights: dict[str, Any], static: bool) -> nn.Module:
    """The model as the artifact computes it: dequantized weights, the online rotations, and (W8A8 static)
    each quantized linear's input at int8 with its calibrated scale."""
    from slm_export.calibration.tune import dequantized_twin

    twin = dequantized_twin(model, weights)
    for name, mod in twin.named_modules():
        if name + ".rotation.signs" in weights:  # registered first: the int8 quantization reads x R
            rot = Rotation(weights[name + ".rotation.signs"], weights[name + ".rotation.block"])
            mod.register_forward_pre_hook(lambda m, a, r=rot: (r.apply(a[0]),))
        q = weights.get(name + ".weight")
        if static and isinstance(q, QuantizedTensor) and q.act_scale is not None:
            mod.register_forward_pre_hook(lambda m, a, s=q.act_scale: (fake_quant(a[0], s),))
    return twin.eval()


CONFIGS = {
    "rtn": CompressConfig("int4", "rtn", 32),
    "awq-gptq": CompressConfig("int4", "awq-gptq", 32, calib_samples=2, calib_seqlen=24, lm_head_bits=4),
    "w8a8": CompressConfig("int8", "smoothquant", calib_samples=4, calib_seqlen=32, rotate=64),
}
# Relative logit error ||q - f|| / ||f|| of the fake-quantized model: random weights (initializer 0.2) and int4
# groups of 32 lose much more than a trained model; these bounds catch a wrong fold, layout or argument.
BOUND = {"rtn": 0.6, "awq-gptq": 0.6, "w8a8": 0.3}


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("name", ALL)
def test_compress_every_family(name: str, method: str) -> None:
    model = family_model(name)
    traits = traits_for(model.model_type, model.config)
    result = compress(model, CONFIGS[method])
    linears = layer_modules(model, traits)
    for full in linears:
        q = result.weights[full + ".weight"]
        assert isinstance(q, QuantizedTensor), full
        assert q.bits == (8 if method == "w8a8" else 4)
        assert q.shape[1] == (linears[full].in_features if isinstance(linears[full], nn.Linear)
                              else linears[full].weight.shape[0])  # [out, in], Conv1D's too
    if method == "w8a8":
        assert all(result.weights[f + ".weight"].act_scale for f in linears)
        down = [k for k in result.weights if k.endswith(".rotation.signs")]
        if traits.down_proj:
            want = [f"{traits.layers}.{i}.{traits.down_proj}" for i in range(len(decoder_layers(model.torch_module())))]
            assert [k.removesuffix(".rotation.signs") for k in down] == want
        else:  # the family's export has no online rotation: none is made
            assert not down
            assert any("not rotated: the" in n for n in result.notes)
    if method == "awq-gptq":
        assert isinstance(result.weights[traits.lm_head], QuantizedTensor)
        scaled = {n.rsplit(".", 1)[0].split(".", 1 + traits.layers.count(".") + 1)[-1] for n, (c, _) in
                  result.channel_scales.items() if c is not None and n != traits.lm_head}
        assert scaled == {r for _, readers in traits.scale_groups for r in readers}  # folds exactly the traits'
        assert any(n.startswith("awq-gptq: per-channel scales folded into each layer's") for n in result.notes)
    ref = logits(model.torch_module())
    got = logits(fake_quantized(model, result.weights, static=method == "w8a8"))
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < BOUND[method], rel


def test_awq_head_folds_into_opt_project_out() -> None:
    # OPT-350m has no final norm: the head reads project_out, whose rows take the head's 1 / s.
    model = family_model("opt-350m-style")
    traits = traits_for(model.model_type, model.config)
    assert traits.head_producer(model.weights) == ("model.decoder.project_out", True)
    result = compress(model, CONFIGS["awq-gptq"])
    s = result.channel_scales[traits.lm_head][0]
    assert s is not None
    assert float((s - 1).abs().max()) > 1e-3
    torch.testing.assert_close(result.weights["model.decoder.project_out.weight"],
                               model.weights["model.decoder.project_out.weight"] / s[:, None])


def test_layernorm_head_fold_divides_the_bias_too() -> None:
    model = family_model("phi")
    traits = traits_for(model.model_type, model.config)
    result = compress(model, CONFIGS["awq-gptq"])
    s = result.channel_scales[traits.lm_head][0]
    bias = traits.final_norm + ".bias"
    torch.testing.assert_close(result.weights[bias], model.weights[bias] / s)
