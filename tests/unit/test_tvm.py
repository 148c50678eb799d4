"""TVM backend on tiny models: the Relax build for the Raspberry Pi 4 (aarch64 library + host library +
params file) runs in TVM's runtime, agrees with the PyTorch reference (float) and with the ONNX Runtime
standard graph and the dequantized-torch twin of the same int4 weights, and decodes through its KV cache
exactly as a full recompute does."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from slm_export.backends import CompileJob, get_backend
from slm_export.backends.tvm.build import elf_info
from slm_export.backends.tvm.ops import pack_int4
from slm_export.calibration.quant import QuantizedTensor, quantize_rtn
from slm_export.errors import CompileError
from slm_export.exporters.onnx import OnnxExporter
from slm_export.models import load_model
from slm_export.models.loader import build_module as _build_module
from slm_export.pipeline import make_plan
from slm_export.runner.tvm_run import PARAMS_FILE, TvmDecoder
from slm_export.targets import get_target
from slm_export.validation.generate import OnnxDecoder, make_session

pytest.importorskip("tvm")
IDS = np.asarray([[3, 9, 27, 81, 243, 100, 7, 1, 55, 200]], dtype=np.int64)
EM_AARCH64 = 183


def _build(tiny: Path, out: Path, precision: str = "fp32", weights: dict[str, Any] | None = None) -> Any:
    profile = get_target("rpi4b")
    plan = dataclasses.replace(make_plan(profile, str(tiny), out / "plan", precision), max_seq_len=128)
    model = load_model(str(tiny))
    out.mkdir(parents=True, exist_ok=True)
    job = CompileJob(plan, profile, out / "model.onnx", model=model, weights=weights)
    return get_backend("tvm").compile(job), model


def _greedy(module: Any, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(module(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def fp32_build(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    out = tmp_path_factory.mktemp("tvm-qwen2")  # untied head, q/k/v biases, grouped-query heads
    result, model = _build(tiny_models["qwen2"], out)
    return result, model, out


def test_float_build_matches_the_reference_and_decodes_with_the_cache(fp32_build: tuple[Any, Any, Path]) -> None:
    result, model, out = fp32_build
    assert result.status == "done"
    assert set(result.files) == {"tvm_host.so", "tvm_aarch64.so", PARAMS_FILE}
    assert result.runtime_model == "tvm_host.so"
    assert "Untuned" in result.note
    assert result.details["aarch64_target"]["mcpu"] == "cortex-a72"
    assert result.details["aarch64_target"]["mattr"] == ["+neon"]
    dec = TvmDecoder(out / "tvm_host.so", 1)
    ref = model.torch_module()
    with torch.no_grad():
        expected = ref(torch.from_numpy(IDS)).logits.numpy()
    np.testing.assert_allclose(dec.logits(IDS), expected, atol=1e-4, rtol=0)
    prompt = IDS[0].tolist()
    tokens, timing = dec.generate(prompt, 8)
    assert tokens == _greedy(ref, prompt, 8)
    assert len(timing.decode_s) == 7
    # decode through the cache = full recompute of the whole sequence
    full = dec.logits(np.asarray([prompt + tokens[:-1]]))[0]
    assert full[len(prompt) - 1:].argmax(-1).tolist() == tokens


def test_left_padded_batch_equals_unpadded_rows(fp32_build: tuple[Any, Any, Path]) -> None:
    _, _, out = fp32_build
    dec = TvmDecoder(out / "tvm_host.so", 1)
    short = IDS[:, 3:]
    ids = np.concatenate([np.concatenate([[[1, 1, 1]], short], 1), IDS])
    mask = np.concatenate([np.concatenate([[[0, 0, 0]], np.ones_like(short)], 1), np.ones_like(IDS)])
    got = dec.logits(ids, mask)
    np.testing.assert_allclose(got[0, 3:], dec.logits(short)[0], atol=1e-5)
    np.testing.assert_allclose(got[1], dec.logits(IDS)[0], atol=1e-5)


def test_aarch64_library_is_an_arm64_elf_needing_only_libc(fp32_build: tuple[Any, Any, Path]) -> None:
    result, _, out = fp32_build
    elf = elf_info(out / "tvm_aarch64.so")
    assert elf == {"e_machine": EM_AARCH64, "needed": ["libc.so.6"]}
    assert result.details["aarch64_elf"] == elf
    assert elf_info(out / "tvm_host.so")["e_machine"] != EM_AARCH64
    # the libraries hold code only: the weights are in the params file
    assert result.details["bytes"][PARAMS_FILE] > 0
    readelf = "aarch64-linux-gnu-readelf"
    if subprocess.run(["which", readelf], capture_output=True).returncode == 0:
        dyn = subprocess.run([readelf, "-d", str(out / "tvm_aarch64.so")], capture_output=True, text=True).stdout
        assert [ln for ln in dyn.splitlines() if "NEEDED" in ln] == [ln for ln in dyn.splitlines()
                                                                    if "NEEDED" in ln and "libc.so.6" in ln]


def test_runtime_only_tvm_runs_the_library(fp32_build: tuple[Any, Any, Path], tmp_path: Path) -> None:
    """What the board runs: TVM's runtime library alone and the runner copied out as ``slm_runner`` (no torch,
    no slm_export)."""
    import shutil

    import slm_export.runner

    _, _, out = fp32_build
    shutil.copytree(Path(slm_export.runner.__file__).parent, tmp_path / "slm_runner")
    code = (
        f"import sys, json\nsys.path.insert(0, {str(tmp_path)!r})\n"
        "from slm_runner.tvm_run import TvmDecoder\n"
        "runner_torch = 'torch' in sys.modules\n"  # (tvm_ffi itself imports torch where it is installed)
        "import tvm\n"
        f"d = TvmDecoder({str(out / 'tvm_host.so')!r}, 1)\n"
        f"tokens, _ = d.generate({IDS[0].tolist()!r}, 4)\n"
        "print(json.dumps({'runtime_only': bool(tvm.base._RUNTIME_ONLY), 'torch': runner_torch,\n"
        "                  'slm_export': 'slm_export' in sys.modules,\n"
        "                  'tokens': tokens}))\n"
    )
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["runtime_only"] is True
    assert (got["torch"], got["slm_export"]) == (False, False)
    assert got["tokens"] == TvmDecoder(out / "tvm_host.so", 1).generate(IDS[0].tolist(), 4)[0]


@pytest.mark.parametrize(("symmetric", "signed"), [(True, False), (True, True), (False, False)])
def test_int4_keeps_codes_and_matches_ort_and_the_dequantized_twin(symmetric: bool, signed: bool,
                                                                     tiny_models: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    """signed: symmetric with negative scales in some groups (rpi4b's --symmetric plan), which the kernels
    and ONNX Runtime's DequantizeLinear must multiply as stored."""
    tiny = tiny_models["llama"]  # tied embeddings
    model = load_model(str(tiny))
    weights: dict[str, Any] = dict(model.weights)
    for name in [k for k in weights if k.endswith("proj.weight")]:
        weights[name] = quantize_rtn(weights[name], 4, 32, symmetric=symmetric, signed=signed)
        assert weights[name].signed_scales == signed
    result, _ = _build(tiny, tmp_path / "tvm", "int4", weights)
    assert result.status == "done"
    assert "packed two per byte" in result.details["weights"]
    # the params file holds the packed codes, not float weights of the projections
    q = weights["model.layers.0.self_attn.o_proj.weight"]
    with np.load(tmp_path / "tvm" / PARAMS_FILE) as data:
        meta = json.loads(str(data["__meta__"]))
        arrays = {n: data[f"p{i:04d}"] for i, n in enumerate(meta["params"])}
    np.testing.assert_array_equal(arrays["layers.0.o.codes"], pack_int4(q.codes))
    assert arrays["layers.0.o.codes"].dtype == np.uint8
    assert arrays["layers.0.o.codes"].shape == (q.shape[0], q.shape[1] // 2)
    assert ("layers.0.o.zeros" in arrays) == (not symmetric)
    assert not any(n.endswith(".weight") and a.ndim == 2 and "embed" not in n for n, a in arrays.items())
    got = TvmDecoder(tmp_path / "tvm" / "tvm_host.so", 1).logits(IDS)
    # the dequantized-torch twin of the same weights
    sd = {k: torch.from_numpy(v.dequantize()) if isinstance(v, QuantizedTensor) else v for k, v in weights.items()}
    twin = _build_module(type(model)(**{**model.__dict__, "weights": sd, "_module": []}))
    with torch.no_grad():
        np.testing.assert_allclose(got, twin(torch.from_numpy(IDS)).logits.numpy(), atol=1e-4, rtol=0)
    # ONNX Runtime on the standard graph (blocked DequantizeLinear, no MatMulNBits) of the same weights
    plan = dataclasses.replace(make_plan(get_target("rpi4b"), str(tiny), tmp_path / "p", "int4"), max_seq_len=128,
                               graph_ops="standard", opset=21)
    (tmp_path / "onnx").mkdir()
    exported = OnnxExporter().export(model, plan, tmp_path / "onnx", weights)
    ort = OnnxDecoder(make_session(exported.model_path, 1)).logits(IDS)
    np.testing.assert_allclose(got, ort, atol=2e-4, rtol=0)
    assert (got.argmax(-1) == ort.argmax(-1)).all()


def test_missing_tvm_is_reported_with_an_install_hint(tiny_models: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import slm_export.backends.tvm as tvm_backend

    monkeypatch.setattr(tvm_backend, "_version", lambda: None)
    backend = get_backend("tvm")
    check = backend.check()
    assert not check.usable
    assert "pip install apache-tvm" in check.install
    assert "gcc-aarch64-linux-gnu" in check.install
    profile = get_target("rpi4b")
    plan = make_plan(profile, str(tiny_models["llama"]), tmp_path, "fp32")
    model = load_model(str(tiny_models["llama"]))
    job = CompileJob(plan, profile, tmp_path / "model.onnx", model=model)
    # a profile's second backend: said, not faked, and the run goes on with ONNX Runtime's artifact
    skipped = backend.compile(job)
    assert skipped.status == "not run"
    assert "install" in skipped.note
    with pytest.raises(CompileError, match="install"):  # the plan's own backend: an error
        backend.compile(dataclasses.replace(job, plan=dataclasses.replace(plan, backend="tvm")))


def test_what_the_build_does_not_take_is_not_run(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    profile = get_target("rpi4b")
    model = load_model(str(tiny_models["llama"]))
    backend = get_backend("tvm")
    fp16 = make_plan(profile, str(tiny_models["llama"]), tmp_path, "fp16")
    result = backend.compile(CompileJob(fp16, profile, tmp_path / "model.onnx", model=model))
    assert (result.status, "fp16" in result.note) == ("not run", True)
    enc = CompileJob(fp16, profile, tmp_path / "model.onnx", "encoder", model=model)
    assert backend.compile(enc).status == "not run"
    w8a8 = dict(model.weights)
    name = "model.layers.0.self_attn.q_proj.weight"
    w8a8[name] = dataclasses.replace(quantize_rtn(w8a8[name], 8, 64, True), act_dynamic=True)
    int8 = make_plan(profile, str(tiny_models["llama"]), tmp_path, "int8")
    result = backend.compile(CompileJob(int8, profile, tmp_path / "model.onnx", model=model, weights=w8a8))
    assert result.status == "not run"
    assert "W8A8" in result.note


def test_kernels_match_numpy_for_every_weight_kind_and_row_count() -> None:
    """The hand-written TIR kernels (backends/tvm/kernels.py) alone: float, packed int4 (zero points per group or one
    constant) and one-code-per-byte linears, with and without bias, for row counts that hit the register
    tile, its leftover rows and both; the attention with grouped heads, a cache and a left-padded row."""
    import tvm

    from slm_export.backends.tvm.attention import attention_kernel
    from slm_export.backends.tvm.build import host_target
    from slm_export.backends.tvm.kernels import linear_kernel
    from slm_export.backends.tvm.ops import torch_ops, unpack_int4

    target = tvm.target.Target(host_target())
    rng = np.random.default_rng(0)

    def run(func: Any, args: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
        ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
        out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
        ex.mod["main"](*(tvm.runtime.tensor(a) for a in args), out)
        return out.numpy()

    codes = rng.integers(0, 16, (32, 64)).astype(np.uint8)
    assert (unpack_int4(pack_int4(codes)) == codes).all()
    for n, k, quant, group, zero, bias in [(30, 20, None, 0, None, True), (32, 64, "int4", 32, None, False),
                                           (32, 64, "int4", 16, 8.0, True), (24, 40, "byte", 20, None, False)]:
        codes = rng.integers(0, 16 if quant == "int4" else 256, (n, k)).astype(np.uint8)
        scales = rng.random((n, max(k // max(group, 1), 1))).astype(np.float32)
        zeros = rng.integers(0, 16, scales.shape).astype(np.uint8)
        b = rng.standard_normal(n).astype(np.float32)
        if quant:
            z = np.repeat(zeros, group, 1) if zero is None else zero
            w = (codes.astype(np.float32) - z) * np.repeat(scales, group, 1)
            stored = pack_int4(codes) if quant == "int4" else codes
            args = [stored, scales, zeros if zero is None else scales]
        else:
            w = rng.standard_normal((n, k)).astype(np.float32)
            args = [w, w, w]
        func = linear_kernel(n, k, quant, group, zero, bias)
        for batch, seq in [(1, 1), (2, 3), (1, 6), (1, 13)]:
            x = rng.standard_normal((batch, seq, k)).astype(np.float32)
            got = run(func, [x, *args, b if bias else w], (batch, seq, n))
            np.testing.assert_allclose(got, x @ w.T + (b if bias else 0), atol=1e-4, rtol=1e-5)
    heads, kv, d, s, t = 4, 2, 16, 5, 40
    q, k_all, v_all = (rng.standard_normal(shape).astype(np.float32) for shape in
                       [(2, heads, s, d), (2, kv, t, d), (2, kv, t, d)])
    keep = np.ones((2, t), bool)
    keep[1, :3] = False
    causal = np.arange(t)[None, :] <= (np.arange(s) + t - s)[:, None]
    mask = (np.where(causal, 0, -1e9)[None, None] + np.where(keep, 0, -1e9)[:, None, None, :]).astype(np.float32)
    got = run(attention_kernel(heads, kv, d), [q, k_all, v_all, mask], (2, s, heads * d))
    ref = torch_ops().tvm_attention(*(torch.from_numpy(a) for a in (q, k_all, v_all, mask))).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
