"""The two PyTorch rebuilds of the decoder (ExecuTorch's module before lowering, TVM's functional module) against
transformers at float32, for every family and variant of tests/families.py (windows of 4, clipping soft-caps,
multipliers far from 1: each feature bites within these 12 tokens): the logits of a 12-token sequence, the
logits of each step through the rebuild's KV cache (prefill, then one token at a time), and 12 greedy tokens.
Then the lowered forms for representative families (a .pte through ExecuTorch's runtime, a TVM host library),
and the preflight refusal of what a rebuild cannot build (exit 2, before any work).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from slm_export.backends.executorch.torch_decoder import build_torch_decoder
from slm_export.backends.tvm.torch_decoder import build_functional_decoder
from slm_export.errors import ConfigError
from slm_export.models import load_model
from slm_export.models.adapters import spec_for
from slm_export.models.rope import Rope
from slm_export.validation.generate import torch_greedy
from tests.families import FAMILIES, VARIANTS, make_family_model
from tests.unit.test_rope import CASES as ROPE_CASES
from tests.unit.test_rope import ORIGINAL, SWITCHING
from tests.unit.test_rope import _config as rope_config

IDS = np.asarray([[5, 17, 99, 3, 250, 42, 7, 11, 64, 200, 31, 9]], dtype=np.int64)
ALL = [*FAMILIES, *VARIANTS]
PREFILL = 5  # cache path: 5 tokens at once, then the other 7 one at a time (past the windows of 4)
MAX_LEN = 64


@pytest.fixture(scope="module")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rebuild-families")
    return {name: make_family_model(name, root / name) for name in ALL}


def _reference(model: Any) -> tuple[np.ndarray, list[int]]:
    """transformers' logits of IDS and its 12 greedy tokens after IDS."""
    with torch.no_grad():
        ref = model.torch_module()(torch.from_numpy(IDS)).logits.numpy()[0]
    return ref, torch_greedy(model.torch_module(), IDS[0].tolist(), 12)


class _Et:
    """The ExecuTorch module eagerly: ``step(tokens)`` feeds them at the next cache position."""

    def __init__(self, spec: Any, max_len: int = MAX_LEN) -> None:
        self.module, self.pos = build_torch_decoder(spec, max_len), 0

    def step(self, tokens: list[int]) -> np.ndarray:
        with torch.no_grad():
            out = self.module(torch.tensor([tokens]), torch.tensor([self.pos])).numpy()[0]
        self.pos += len(tokens)
        return out


class _Tvm:
    """The TVM functional module eagerly, its present keys and values fed back as the next step's past."""

    def __init__(self, spec: Any, max_len: int = MAX_LEN) -> None:
        self.module = build_functional_decoder(spec, max_len)
        self.past = [torch.zeros(1, spec.kv_heads, 0, spec.head_dim) for _ in range(2 * len(spec.layers))]

    def step(self, tokens: list[int]) -> np.ndarray:
        p, s = self.past[0].shape[2], len(tokens)
        with torch.no_grad():
            logits, *self.past = self.module(torch.tensor([tokens]), torch.ones(1, s, dtype=torch.long),
                                             torch.arange(p, p + s)[None], self.past)
        return logits.numpy()[0]


def _check(make: Any, model: Any, max_len: int = MAX_LEN) -> None:
    spec = spec_for(model.config, model.weights)
    ref, greedy = _reference(model)
    np.testing.assert_allclose(make(spec, max_len).step(IDS[0].tolist()), ref, atol=3e-4, rtol=1e-3)
    run, ids = make(spec, max_len), IDS[0].tolist()
    steps = [run.step(ids[:PREFILL])] + [run.step([t]) for t in ids[PREFILL:]]
    np.testing.assert_allclose(np.concatenate(steps), ref, atol=3e-4, rtol=1e-3)
    run = make(spec, max_len)
    row, got = run.step(ids)[-1], []
    for _ in range(12):
        got.append(int(row.argmax()))
        row = run.step([got[-1]])[-1]
    assert got == greedy


@pytest.mark.parametrize("name", ALL)
def test_executorch_module_matches_transformers(name: str, family_models: dict[str, Path]) -> None:
    _check(_Et, load_model(str(family_models[name])))


@pytest.mark.parametrize("name", ALL)
def test_tvm_module_matches_transformers(name: str, family_models: dict[str, Path]) -> None:
    _check(_Tvm, load_model(str(family_models[name])))


@pytest.mark.parametrize("backend", ["executorch", "tvm"])
@pytest.mark.parametrize("name", ROPE_CASES)
def test_rope_scaling_kinds_match_transformers(name: str, backend: str, tmp_path: Path) -> None:
    """Every rope scaling kind (test_rope's cases: each one changes the logits); the kinds that change with
    the call's length within their original context, the longest the rebuilds take."""
    folder = make_family_model("llama", tmp_path / name, rope_config(name))
    _check(_Et if backend == "executorch" else _Tvm, load_model(str(folder)),
           ORIGINAL if name in SWITCHING else MAX_LEN)


def test_windowed_layers_take_the_masked_path_and_the_rest_custom_sdpa(family_models: dict[str, Path]) -> None:
    """custom_sdpa knows no window or soft-cap: only the layers that need neither keep it."""
    for name, masked in [("gemma2", [True, True]), ("gemma3_text", [True, False]), ("llama", [False, False])]:
        model = load_model(str(family_models[name]))
        module = build_torch_decoder(spec_for(model.config, model.weights), MAX_LEN)
        assert [layer.masked for layer in module.layers] == masked, name
    # a window no shorter than the cache hides nothing: the fast path
    model = load_model(str(family_models["mistral"]))
    module = build_torch_decoder(spec_for(model.config, model.weights), 4)
    assert not any(layer.masked for layer in module.layers)


@pytest.mark.parametrize("name", ["gemma2", "phi", "opt-350m-style"])
def test_pte_of_representative_families(name: str, family_models: dict[str, Path], tmp_path: Path) -> None:
    """Windowed and soft-capped (gemma2), parallel (phi), post-LN with projections (opt-350m-style): lowered to
    XNNPACK, run by ExecuTorch's runtime."""
    pytest.importorskip("executorch")
    from slm_export.backends.executorch import lower
    from slm_export.runner.pte_run import PteDecoder

    model = load_model(str(family_models[name]))
    program, _, _ = lower(spec_for(model.config, model.weights), MAX_LEN)
    path = tmp_path / "model.pte"
    with open(path, "wb") as f:
        program.write_to_file(f)
    ref, greedy = _reference(model)
    dec = PteDecoder(path, 1)
    # XNNPACK's tanh and GELU are approximations: logits within 2e-3 (eager: 1e-5)
    np.testing.assert_allclose(dec.logits(IDS)[0], ref, atol=2e-3, rtol=1e-3)
    assert dec.generate(IDS[0].tolist(), 12)[0] == greedy


def test_tvm_library_of_a_windowed_soft_capped_family(family_models: dict[str, Path], tmp_path: Path) -> None:
    """gemma2 through Relax to a host library: the attention kernel's query scale and soft-cap, the windowed
    masks, the post-norms, the tied head and the final soft-cap."""
    pytest.importorskip("tvm")
    from slm_export.backends.tvm.build import build_tvm_decoder
    from slm_export.runner.tvm_run import PARAMS_FILE, TvmDecoder

    model = load_model(str(family_models["gemma2"]))
    build_tvm_decoder(spec_for(model.config, model.weights), MAX_LEN, tmp_path, None,
                      {"host": "tvm_host.so", "params": PARAMS_FILE})
    ref, greedy = _reference(model)
    dec = TvmDecoder(tmp_path / "tvm_host.so", 1)
    np.testing.assert_allclose(dec.logits(IDS)[0], ref, atol=3e-4, rtol=1e-3)
    assert dec.generate(IDS[0].tolist(), 12)[0] == greedy
    steps = [dec.logits(IDS[:, :n + 1])[0, -1] for n in range(PREFILL, 12)]  # each prefix alone
    np.testing.assert_allclose(np.stack(steps), ref[PREFILL:], atol=3e-4, rtol=1e-3)


def _with_rope(spec: Any, kind: str, switch: int = 32) -> Any:
    params = {"dynamic": {"factor": 2.0, "max_position_embeddings": switch},
              "longrope": {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                           "original_max_position_embeddings": switch},
              "linear": {"factor": 2.0}}[kind]
    return dataclasses.replace(spec, ropes=(Rope(theta=10000.0, dim=16, kind=kind, params=tuple(params.items())),))


def test_length_dependent_ropes_are_refused_past_their_switch(family_models: dict[str, Path]) -> None:
    from slm_export.backends import executorch, tvm

    model = load_model(str(family_models["llama"]))
    spec = spec_for(model.config, model.weights)
    assert executorch.unsupported(spec, MAX_LEN) is None
    assert tvm.unsupported(spec, MAX_LEN) is None
    assert executorch.unsupported(_with_rope(spec, "linear"), MAX_LEN) is None  # fixed tables: built
    for kind in ("dynamic", "longrope"):
        odd = _with_rope(spec, kind)
        assert executorch.unsupported(odd, 32) is None  # within the original context: one set of tables
        for check in (executorch.unsupported, tvm.unsupported):
            assert f"rope_type '{kind}' for {MAX_LEN} positions" in (check(odd, MAX_LEN) or "")
            assert "passes 32 positions" in (check(odd, MAX_LEN) or "")
        for build in (build_torch_decoder, build_functional_decoder):
            with pytest.raises(ConfigError, match=f"rope_type '{kind}'"):
                build(odd, MAX_LEN)


def test_preflight_refuses_a_dynamic_rope_for_android_with_exit_2(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A model the adapters and the ONNX graph take but the .pte cannot (dynamic scaling past 512 positions,
    android's 2048): refused after loading, before calibration, naming the backend, the family, the feature
    and the targets that take it; the host target's ONNX Runtime artifact is not refused."""
    import transformers

    from slm_export import preflight
    from slm_export.cli import main
    from slm_export.targets import get_target
    kwargs = {**FAMILIES["llama"][1], "rope_parameters": {"rope_type": "dynamic", "factor": 2.0,
                                                          "rope_theta": 10000.0}}
    folder = make_family_model("llama", tmp_path / "llama-dynamic", transformers.LlamaConfig(**kwargs))
    code = main(["--target", "android", "--model", str(folder), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "backend executorch cannot build this llama model" in err
    assert "rope_type 'dynamic' for 2048 positions" in err
    assert "host" in err  # where it can go instead
    assert not (tmp_path / "out").exists()
    model = load_model(str(folder))
    plan = type("P", (), {"backend": "onnxruntime", "precision": "fp32", "max_seq_len": 2048})()
    assert preflight.check_rebuilds(model, plan, get_target("host")) is None  # ONNX only: nothing to refuse
    # rpi4b's tvm is a secondary backend: the run goes on, its step "not run" with the reason, said up front
    assert "secondary backend tvm cannot build" in (preflight.check_rebuilds(model, plan, get_target("rpi4b")) or "")
    plan.backend = "tvm"  # as the plan's own backend it is refused
    with pytest.raises(ConfigError, match="backend tvm"):
        preflight.check_rebuilds(model, plan, get_target("rpi4b"))
    plan.max_seq_len = 512  # within the original context: one set of tables serves
    assert preflight.check_rebuilds(model, plan, get_target("rpi4b")) is None
    plan.precision, plan.max_seq_len = "fp16", 2048  # the rebuilds are "not run" at fp16: ONNX Runtime ships alone
    assert preflight.check_rebuilds(model, plan, get_target("rpi4b")) is None
