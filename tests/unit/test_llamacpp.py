"""The llama.cpp backend: model.gguf written from tiny llama and qwen2 models at each precision, read back with the
project's own GGUF reader (which dequantizes and un-permutes q/k), the refusals, and, where llama-cpp-python
imports, the file run by llama.cpp itself through the runner."""

from __future__ import annotations

import json
from dataclasses import replace
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from slm_export.backends import CompileJob, get_backend
from slm_export.backends.llamacpp import GGUF_FILE, model_refusal, plan_refusal, runtime_version
from slm_export.backends.llamacpp.blocks import encode, measured, quant_refusal
from slm_export.backends.llamacpp.gguf_file import permutation
from slm_export.backends.llamacpp.vocab import from_gguf, pre_tokenizer
from slm_export.calibration.compress import compress
from slm_export.calibration.quant import quantize_rtn
from slm_export.cli import main
from slm_export.errors import CompileError
from slm_export.models import load_model
from slm_export.models.builtin import BUILTIN_MODELS
from slm_export.pipeline import make_plan
from slm_export.targets import get_target
from tests.conftest import make_tiny_model

SAMPLE = "The quick brown fox, 12345 jumps!\n  Über naïve café: def f(x): return x ** 2"
CASES = {  # name: (precision, options, the GGUF types of the linear layers)
    "fp32": ("fp32", {}, {"F32"}),
    "int8-rtn": ("int8", {"method": "rtn", "symmetric": True}, {"Q8_0"}),
    "int4-rtn-symmetric": ("int4", {"method": "rtn", "symmetric": True}, {"Q4_0"}),
    "int4-rtn-asymmetric": ("int4", {"method": "rtn", "lm_head_bits": 0}, {"Q4_1"}),
    "int4-gptq-g64": ("int4", {"method": "gptq", "symmetric": True, "group_size": 64, "lm_head_bits": 8,
                               "calib_samples": 4, "calib_seqlen": 64}, {"Q4_0"}),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny llama and qwen2, their end token spelt <|endoftext|> as SmolLM2's and Qwen2's are: transformers'
    GGUF tokenizer reader adds that token to any byte-level vocabulary lacking it, one row past the embedding."""
    out = {}
    for arch in ("llama", "qwen2"):
        folder = make_tiny_model(arch, tmp_path_factory.mktemp("gguf") / arch)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            path = folder / name
            path.write_text(path.read_text().replace("<eos>", "<|endoftext|>"))
        out[arch] = folder
    return out


def _compile(folder: Path, tmp: Path, precision: str, target: str = "host", **opts: Any) -> tuple[Any, Any, Any]:
    """(compile result, the loaded model, the compress stage's weights or None)."""
    profile = get_target(target)
    plan = make_plan(profile, str(folder), tmp / "plan-out", precision, **opts)
    model = load_model(str(folder))
    weights = compress(model, plan).weights if plan.precision in ("int8", "int4") else None
    out = tmp / "artifact"
    out.mkdir()
    job = CompileJob(plan, profile, out / "model.onnx", "decoder", model=model, weights=weights)
    return get_backend("llamacpp").compile(job), model, weights


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("case", list(CASES))
def test_gguf_round_trip(arch: str, case: str, models: dict[str, Path], tmp_path: Path) -> None:
    precision, opts, linear_types = CASES[case]
    result, model, weights = _compile(models[arch], tmp_path, precision, **opts)
    assert result.status == "done", result.note
    assert result.files == (GGUF_FILE,)
    d = result.details
    types = set(d["tensor_types"])
    assert linear_types <= types <= linear_types | {"F32", "Q8_0"}  # + float embedding/norms, an int8 head
    back = load_model(str(tmp_path / "artifact" / GGUF_FILE))  # dequantized to float32, q/k un-permuted
    source = weights if weights is not None else model.weights
    if case == "int4-rtn-symmetric":  # the host's symmetric int4 has signed scales: Q4_0's d keeps the sign
        assert any(getattr(w, "signed_scales", False) for w in source.values())
    worst = 0.0
    for name, w in source.items():
        if name not in back.weights:  # a tied float head: llama.cpp reads the embedding table
            assert name == "lm_head.weight"
            assert d["tied_head"]
            continue
        ref = measured(w if not hasattr(w, "detach") else w.detach().numpy(), precision)
        worst = max(worst, float(np.abs(back.weights[name].numpy() - ref).max()))
    assert worst == pytest.approx(d["max_abs_weight_diff"], abs=1e-9)  # the reported fp16-scale effect
    if precision == "fp32":
        assert worst == 0.0
        assert d["max_rel_weight_diff"] == 0.0
    else:  # the fp16 rounding of a scale (2**-11 relative) times at most 128 levels
        assert 0 < worst < 2.0**-11 * 128 * max(float(np.abs(q.scales).max()) for q in source.values()
                                                 if hasattr(q, "scales"))
        assert 0 < d["max_rel_weight_diff"] < 2.0**-8  # fp16 rounding of a scale (and of Q4_1 m), relative
    assert back.tokenizer.encode(SAMPLE, add_special_tokens=False) == \
        model.tokenizer.encode(SAMPLE, add_special_tokens=False)
    assert back.config.num_key_value_heads == model.config.num_key_value_heads


def test_blocks_are_ggml_layouts() -> None:
    """Q4_0 keeps our codes and (signed) scales: the low nibbles are a block's first 16 weights; Q8_0's bytes
    are the codes less 128; a group of 64 is two blocks with one scale."""
    rng = np.random.default_rng(0)
    q = quantize_rtn(rng.standard_normal((4, 64)).astype(np.float32), 4, 64, True, signed=True)
    kind, data = encode(q)
    assert kind == "Q4_0"
    assert data.shape == (4, 2 * 18)
    block = data[0, :18]
    assert block[:2].view(np.float16)[0] == np.float16(q.scales[0, 0])
    assert list(block[2:] & 0x0F) == list(q.codes[0, :16])
    assert list(block[2:] >> 4) == list(q.codes[0, 16:32])
    assert data[0, 18:20].view(np.float16)[0] == np.float16(q.scales[0, 0])  # the same scale, repeated
    q8 = quantize_rtn(rng.standard_normal((2, 32)).astype(np.float32), 8, 32, True)
    kind, data = encode(q8)
    assert kind == "Q8_0"
    assert list(data[0, 2:].view(np.int8)) == list(q8.codes[0].astype(int) - 128)


def test_llama_permutation_is_convert_hf_to_gguf() -> None:
    """convert_hf_to_gguf.py's LlamaModel.permute, spelt out."""
    w = np.arange(16 * 3).reshape(16, 3)
    heads = 2
    ref = w.reshape(heads, 2, 16 // heads // 2, 3).swapaxes(1, 2).reshape(w.shape)
    assert (w[permutation(16, heads)] == ref).all()


def test_refusals_say_why(models: dict[str, Path], tmp_path: Path) -> None:
    profile = get_target("host")
    plan = make_plan(profile, str(models["llama"]), tmp_path / "o", "int4", method="rtn", group_size=16,
                     lm_head_bits=0)
    assert "multiple of 32" in plan_refusal(plan)
    assert "W8A8" in plan_refusal(make_plan(profile, str(models["llama"]), tmp_path / "o", "int8", method="dynamic"))
    assert "--symmetric" in plan_refusal(make_plan(profile, str(models["llama"]), tmp_path / "o", "int8",
                                                   method="rtn"))
    assert "hot rows" in plan_refusal(make_plan(profile, str(models["llama"]), tmp_path / "o", "int4",
                                                method="gptq", calib_samples=4, calib_seqlen=64))
    assert plan_refusal(make_plan(profile, str(models["llama"]), tmp_path / "o", "int4", method="rtn",
                                  symmetric=True)) is None
    q16 = quantize_rtn(np.ones((2, 32), np.float32), 4, 16, True)
    assert "multiple of 32" in quant_refusal(q16)
    # a secondary backend is "not run" with the reason; the plan's own backend fails the run
    result, _, _ = _compile(models["llama"], tmp_path, "int4", method="rtn", group_size=16, lm_head_bits=0)
    assert result.status == "not run"
    assert "multiple of 32" in result.note
    job = CompileJob(replace(plan, backend="llamacpp"), profile, tmp_path / "model.onnx", "decoder",
                     model=load_model(str(models["llama"])))
    with pytest.raises(CompileError, match="multiple of 32"):
        get_backend("llamacpp").compile(job)


def test_architectures_llama_cpp_would_compute_differently() -> None:
    assert "phi3" in model_refusal(SimpleNamespace(model_type="phi3"))
    assert "llama3" in model_refusal(SimpleNamespace(model_type="llama", rope_parameters={"rope_type": "llama3"}))
    assert "sliding" in model_refusal(SimpleNamespace(model_type="mistral", sliding_window=4096))
    assert model_refusal(SimpleNamespace(model_type="qwen2", sliding_window=4096, use_sliding_window=False)) is None


def test_pre_tokenizers() -> None:
    bpe = {"type": "BPE", "vocab": {}, "merges": []}
    digits = {"type": "Digits", "individual_digits": True}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer({"pre_tokenizer": byte_level, "model": bpe}) == "gpt-2"
    assert pre_tokenizer({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [digits, byte_level]},
                          "model": bpe}) == "smollm"
    with pytest.raises(CompileError, match="no llama.cpp equivalent"):
        pre_tokenizer({"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581"}, "model": bpe})


def test_gguf_source_keeps_its_tokenizer() -> None:
    """The built-in smollm2 is a GGUF: its tokenizer metadata is copied whole."""
    entries = {e.key: e for e in from_gguf(BUILTIN_MODELS.get("smollm2-135m").path())}
    assert entries["tokenizer.ggml.pre"].value == "smollm"
    assert len(entries["tokenizer.ggml.tokens"].value) == 49152
    assert entries["tokenizer.ggml.tokens"].sub_type == "STRING"
    assert "tokenizer.chat_template" in entries


def test_encoder_is_not_run(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    plan = make_plan(get_target("host"), str(tiny_models["bert"]), tmp_path / "o", "fp32")
    job = CompileJob(plan, get_target("host"), tmp_path / "model.onnx", "encoder",
                     model=load_model(str(tiny_models["bert"])))
    assert get_backend("llamacpp").compile(job).status == "not run"



needs_llama_cpp = pytest.mark.skipif(runtime_version() is None, reason="llama-cpp-python is not installed "
                                     "(pip install llama-cpp-python): llama.cpp itself cannot run the .gguf here")


@needs_llama_cpp
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("case", ["fp32", "int8-rtn", "int4-rtn-symmetric", "int4-rtn-asymmetric"])
def test_llama_cpp_runs_the_gguf(arch: str, case: str, models: dict[str, Path], tmp_path: Path) -> None:
    """llama.cpp loads the file, tokenizes like Hugging Face, and computes what PyTorch computes with the GGUF's
    own weights (read back and dequantized): its int8 activations (Q8_0 dot products) and f16 KV cache aside."""
    import llama_cpp
    import torch

    from slm_export.runner.job import open_runtime
    from slm_export.validation.generate import torch_greedy

    precision, opts, _ = CASES[case]
    result, model, _ = _compile(models[arch], tmp_path, precision, **opts)
    path = tmp_path / "artifact" / GGUF_FILE
    assert result.runtime_model == GGUF_FILE
    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    ids = model.tokenizer.encode(SAMPLE, add_special_tokens=False)
    assert vocab.tokenize(SAMPLE.encode(), add_bos=False, special=False) == ids
    decoder, runtime = open_runtime(path, 1)
    assert runtime["runtime"] == "llama.cpp"
    reference = load_model(str(path)).torch_module()
    got = decoder.logits(np.asarray([ids]))[0]
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits[0].numpy()
    agreement = float((got.argmax(-1) == ref.argmax(-1)).mean())
    cosine = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
    scale = float(np.abs(ref).max())
    if precision == "fp32":
        assert agreement == 1.0
        assert np.abs(got - ref).max() < 1e-2 * scale
        assert decoder.generate(ids[:16], 8)[0] == torch_greedy(reference, ids[:16], 8)
    else:  # tiny random models have flat logits: a near tie flips with int8 activations
        assert cosine > 0.999, cosine
        assert agreement >= 0.8, agreement
        assert np.abs(got - ref).max() < 0.15 * scale


def _host_with_gguf(tmp_path: Path) -> Path:
    """The host profile with llamacpp after ONNX Runtime: how a user asks for a GGUF (no built-in profile names it)."""
    text = (resources.files("slm_export.targets") / "profiles" / "host.toml").read_text()
    text = text.replace('id = "host"', 'id = "host-gguf"').replace('order = ["onnxruntime"]',
                                                                 'order = ["onnxruntime", "llamacpp"]')
    text = "\n".join("aliases = []" if line.startswith("aliases =") else line for line in text.splitlines())
    board = tmp_path / "host-gguf.toml"
    board.write_text(text + "\n")
    return board


def test_export_cross_checks_the_gguf(models: dict[str, Path], tmp_path: Path) -> None:
    """Through the CLI: the GGUF sits beside the ONNX artifact, sealed in its manifest, and (where llama.cpp
    imports) is scored on the same windows as the validated file, in the same report."""
    out = tmp_path / "gguf"
    code = main(["--target-file", str(_host_with_gguf(tmp_path)), "--model", str(models["llama"]), "--out", str(out),
                 "--precision", "int4", "--method", "rtn", "--symmetric", "--eval-windows", "2", "--timing-tokens",
                 "8", "--threads", "1", "--json"])
    report = json.loads((out / "report.json").read_text())
    assert code in (0, 1)
    gguf = next(b for b in report["backends"] if b["backend"] == "llamacpp")
    assert gguf["status"] == "done"
    assert (out / GGUF_FILE).is_file()
    assert GGUF_FILE in json.loads((out / "artifact.json").read_text())["integrity"]["files"]
    if runtime_version() is None:
        return
    assert [c["file"] for c in report["crosschecks"]] == [GGUF_FILE]
    loads = {(r["file"], r["runtime"]): r["status"] for r in report["runtime_loads"]}
    assert loads[(GGUF_FILE, "llama.cpp")] == "loads"  # the reports' table of which runtime loads which file
    m = report["metrics"]
    for name in ("perplexity", "top1_agreement", "agreement_with_validated", "greedy_equals_reference",
                 "decode_tokens_per_s_p50"):
        assert f"llamacpp_{name}" in m, name
    assert "llama.cpp" in m["llamacpp_perplexity"]["where"]
    assert m["llamacpp_agreement_with_validated"]["value"] >= 0.9
