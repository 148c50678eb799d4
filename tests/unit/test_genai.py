"""ONNX Runtime GenAI loads the artifact folder as it is, and callers that never feed ``logits_to_keep``
(GenAI, Optimum's ORTModelForCausalLM) run the fused graph: greedy tokens against PyTorch and the project's
runner, for the host's optimized ONNX and the ORT format, float and int4."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from slm_export.backends import CompileJob, get_backend
from slm_export.backends.genai import GENAI_CONFIG, read_graph
from slm_export.cli import main
from slm_export.exporters.onnx import OnnxExporter
from slm_export.models import load_model
from slm_export.planning import make_plan
from slm_export.runner.onnx_run import LOGITS_TO_KEEP, OnnxDecoder, make_session
from slm_export.targets import get_target

QUICK = ["--eval-windows", "1", "--timing-tokens", "4", "--threads", "1", "--calib-samples", "4",
         "--calib-seqlen", "64", "--no-emulate"]
PROMPT = "The quick brown fox jumps over"
NEW = 16


def _genai():  # type: ignore[no-untyped-def]
    try:
        import onnxruntime_genai as og
    except ImportError:
        pytest.skip("onnxruntime_genai is not installed (pip install onnxruntime-genai==0.18.0, the dev extra)")
    return og


def _ort_board(tmp_path: Path) -> Path:
    """rpi4b's profile with ONNX Runtime as its only backend: the same .ort, without the minutes of the TVM
    build (the CLI has no flag to leave a profile's backend out; a profile file is its way)."""
    text = (resources.files("slm_export.targets") / "profiles" / "rpi4b.toml").read_text()
    text = text.replace('id = "rpi4b"', 'id = "rpi4b-ort"').replace('order = ["onnxruntime", "tvm"]',
                                                                  'order = ["onnxruntime"]')
    text = "\n".join("aliases = []" if line.startswith("aliases =") else line for line in text.splitlines())
    board = tmp_path / "rpi4b-ort.toml"
    board.write_text(text + "\n")
    return board


def _export(tiny: Path, target: str, precision: str, out: Path) -> Path:
    where = ["--target-file", str(_ort_board(out.parent))] if target == "ort" else ["--target", target]
    code = main([*where, "--model", str(tiny), "--precision", precision, "--out", str(out), *QUICK])
    assert code == 0
    return out


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def _genai_greedy(og, folder: Path, prompt: list[int]) -> list[int]:  # type: ignore[no-untyped-def]
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + NEW)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def _torch_greedy(tiny: Path, prompt: list[int]) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW)
    return [int(t) for t in out[0, len(prompt):]]


CASES = [("host", "fp32", "llama"), ("host", "fp32", "qwen2"), ("host", "fp32", "gpt2"), ("host", "int4", "llama"),
         ("ort", "fp32", "llama"), ("ort", "int4", "qwen2"), ("android-arm64", "int4", "llama")]
# The file genai_config.json names: the one the ONNX Runtime backend wrote (android validates its .pte).
GENAI_FILE = {"host": "model.optimized.onnx", "ort": "model.ort", "android-arm64": "model.ort"}


@pytest.mark.parametrize(("target", "precision", "arch"), CASES)
def test_genai_loads_the_folder_unchanged(target: str, precision: str, arch: str, tiny_models: dict[str, Path],
                                          tmp_path: Path) -> None:
    og = _genai()
    folder = _export(tiny_models[arch], target, precision, tmp_path / "art")
    report = json.loads((folder / "report.json").read_text())
    runtime = GENAI_FILE[target]
    assert report["validated_file"] == ("model.pte" if target == "android-arm64" else runtime)
    ort_step = next(b for b in report["backends"] if b["backend"] == "onnxruntime")
    assert GENAI_CONFIG in ort_step["files"]
    config = json.loads((folder / GENAI_CONFIG).read_text())["model"]
    assert config["decoder"]["filename"] == runtime
    assert config["type"] == ("decoder" if arch == "gpt2" else arch)
    # sealed with the rest: validate's integrity check covers them
    sealed = json.loads((folder / "artifact.json").read_text())["integrity"]["files"]
    assert {GENAI_CONFIG, "tokenizer.json", "tokenizer_config.json"} <= set(sealed)

    from transformers import AutoTokenizer

    tokenizer = og.Tokenizer(og.Model(str(folder)))
    prompt = [int(t) for t in tokenizer.encode(PROMPT)]
    assert prompt == AutoTokenizer.from_pretrained(tiny_models[arch])(PROMPT)["input_ids"]
    eos = config["eos_token_id"]
    ours, _ = OnnxDecoder(make_session(folder / runtime, 1)).generate(prompt, NEW, eos_token_id=eos)
    genai = _genai_greedy(og, folder, prompt)
    assert genai == ours
    if precision == "fp32":  # int4 rounds the weights: only the two ONNX Runtime runs must agree
        assert genai == _until_eos(_torch_greedy(tiny_models[arch], prompt), eos)


def test_genai_config_follows_the_model_and_the_plan(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    profile = get_target("host")
    plan = make_plan(profile, str(tiny_models["qwen2"]), tmp_path / "plan-out", "fp32")
    model = load_model(str(tiny_models["qwen2"]))
    folder = tmp_path / "art"
    folder.mkdir()
    exported = OnnxExporter().export(model, plan, folder)
    # a generation config that differs from config.json: GenAI's ids and search defaults come from it
    source = tmp_path / "model"
    shutil.copytree(tiny_models["qwen2"], source)
    (source / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7], "bos_token_id": 5,
                                                              "do_sample": True, "temperature": 0.7, "top_k": 20}))
    model = load_model(str(source))
    result = get_backend("onnxruntime").compile(CompileJob(plan, profile, exported.model_path, model=model))
    assert {GENAI_CONFIG, "tokenizer.json", "tokenizer_config.json"} <= set(result.files)
    doc = json.loads((folder / GENAI_CONFIG).read_text())
    m, search = doc["model"], doc["search"]
    assert (m["bos_token_id"], m["eos_token_id"], m["pad_token_id"]) == (5, [0, 7], 1)
    assert (search["do_sample"], search["temperature"], search["top_k"]) == (True, 0.7, 20)
    cfg = model.config
    assert (m["decoder"]["num_hidden_layers"], m["decoder"]["num_attention_heads"], m["decoder"]["num_key_value_heads"],
            m["decoder"]["head_size"], m["decoder"]["hidden_size"], m["vocab_size"]) == (
        cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
        cfg.hidden_size // cfg.num_attention_heads, cfg.hidden_size, cfg.vocab_size)
    # never longer than the graph's rotary table (the plan's max_seq_len) nor the model's own limit
    assert m["context_length"] == search["max_length"] == min(plan.max_seq_len, cfg.max_position_embeddings)
    assert m["decoder"]["session_options"]["graph_optimization_level"] == "ORT_DISABLE_ALL"  # optimized offline
    assert "intra_op_num_threads" not in m["decoder"]["session_options"]
    assert search["past_present_share_buffer"] is True


def test_portable_graphs_get_no_genai_config(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    profile = get_target("jetson-tx2")  # the portable graph, compiled to .ort for the board's ARM cores
    plan = make_plan(profile, str(tiny_models["llama"]), tmp_path / "plan-out", "fp32")
    folder = tmp_path / "art"
    folder.mkdir()
    exported = OnnxExporter().export(load_model(str(tiny_models["llama"])), plan, folder)
    result = get_backend("onnxruntime").compile(CompileJob(plan, profile, exported.model_path))
    assert not (folder / GENAI_CONFIG).exists()
    assert "not the fused ONNX Runtime graph" in result.details["genai"]
    assert isinstance(read_graph(exported.model_path), str)


@pytest.fixture(scope="module")
def fused(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """The host's fused fp32 graph of the tiny llama, exported and optimized as an artifact is."""
    folder = tmp_path_factory.mktemp("fused")
    profile = get_target("host")
    plan = make_plan(profile, str(tiny_models["llama"]), folder / "plan-out", "fp32")
    model = load_model(str(tiny_models["llama"]))
    out = folder / "art"
    out.mkdir()
    exported = OnnxExporter().export(model, plan, out)
    get_backend("onnxruntime").compile(CompileJob(plan, profile, exported.model_path))
    return out, model


@pytest.mark.parametrize("file", ["model.onnx", "model.optimized.onnx"])
def test_callers_that_do_not_feed_logits_to_keep(file: str, fused: tuple[Path, object]) -> None:
    """Optimum's ORTModelForCausalLM feeds input_ids, attention_mask, position_ids and the past, nothing else,
    through plain ONNX Runtime: it gets every position's logits (the graph's default), and its loop of
    growing past and present tensors (no shared buffer) decodes as PyTorch does."""
    import onnxruntime as ort

    folder, model = fused
    session = ort.InferenceSession(str(folder / file), providers=["CPUExecutionProvider"])
    assert LOGITS_TO_KEEP not in {i.name for i in session.get_inputs()}  # optional: an overridable initializer
    assert LOGITS_TO_KEEP in {i.name for i in session.get_overridable_initializers()}
    kv = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in kv}
    ids = [5, 17, 99, 3, 250, 42, 7, 11]
    with torch.no_grad():
        ref = model.torch_module()(torch.tensor([ids])).logits.numpy()  # type: ignore[attr-defined]
    tokens, feed_ids, out = list(ids), ids, []
    names = ["logits", *(i.name.replace("past_key_values.", "present.") for i in kv)]
    for step in range(6):
        n = len(tokens)
        feed = {"input_ids": np.asarray([feed_ids], np.int64), "attention_mask": np.ones((1, n), np.int64),
                "position_ids": np.arange(n - len(feed_ids), n, dtype=np.int64)[None], **past}
        logits, *presents = session.run(names, feed)
        assert logits.shape == (1, len(feed_ids), ref.shape[-1])
        if step == 0:
            np.testing.assert_allclose(logits, ref, atol=2e-4, rtol=1e-3)
        past = {i.name: p for i, p in zip(kv, presents, strict=True)}
        token = int(logits[0, -1].argmax())
        out.append(token)
        tokens.append(token)
        feed_ids = [token]
    from slm_export.validation.generate import torch_greedy

    assert out == torch_greedy(model.torch_module(), ids, 6)  # type: ignore[attr-defined]
    # the project's own sessions default it to the last position (its prefill's saving); scoring feeds 0
    ours = make_session(folder / file, 1)
    prefill = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, 8), np.int64),
               "position_ids": np.arange(8, dtype=np.int64)[None],
               **{i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in kv}}
    np.testing.assert_allclose(ours.run(["logits"], prefill)[0], ref[:, -1:], atol=2e-4, rtol=1e-3)
    np.testing.assert_allclose(ours.run(["logits"], {**prefill, LOGITS_TO_KEEP: np.asarray(0, np.int64)})[0], ref,
                               atol=2e-4, rtol=1e-3)


def test_genai_batches_prompts_of_different_lengths(fused: tuple[Path, object]) -> None:
    """GenAI right-pads a batch and reads each row's logits at its last real token: the reason the graph
    returns every position by default (a [batch, 1, vocab] output, GenAI's trimmed convention, handed the
    shorter row a padding position's logits)."""
    og = _genai()
    folder, _ = fused
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    texts = [PROMPT + " the lazy dog", "Hello"]
    alone = [_genai_greedy(og, folder, [int(t) for t in tokenizer.encode(t)])[:8] for t in texts]
    batch = tokenizer.encode_batch(texts)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, batch_size=2, max_length=batch.as_numpy().shape[1] + 8)
    generator = og.Generator(model, params)
    generator.append_tokens(batch)
    rows: list[list[int]] = [[], []]
    while not generator.is_done():
        generator.generate_next_token()
        for row, token in zip(rows, generator.get_next_tokens(), strict=True):
            row.append(int(token))
    assert rows == alone


def test_earlier_artifacts_with_a_required_logits_to_keep_still_run(fused: tuple[Path, object],
                                                                    tmp_path: Path) -> None:
    """Artifacts exported before logits_to_keep became optional take it as a required input, which the
    runner's generation loop binds to 1."""
    folder, model = fused
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    keep = [t for t in graph.graph.initializer if t.name == LOGITS_TO_KEEP]
    graph.graph.initializer.remove(keep[0])
    shutil.copyfile(folder / "model.onnx.data", tmp_path / "model.onnx.data")
    onnx.save(graph, str(tmp_path / "model.onnx"))
    old = OnnxDecoder(make_session(tmp_path / "model.onnx", 1))
    new = OnnxDecoder(make_session(folder / "model.onnx", 1))
    assert (old.keep_last, old.bind_keep, new.keep_last, new.bind_keep) == (True, True, True, False)
    ids = [5, 17, 99, 3, 250, 42, 7, 11]
    assert old.generate(ids, 8)[0] == new.generate(ids, 8)[0]
    np.testing.assert_allclose(old.logits(np.asarray([ids])), new.logits(np.asarray([ids])), atol=1e-6)
