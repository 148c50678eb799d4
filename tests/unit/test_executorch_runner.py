"""ExecuTorch's own LLM runner (``TextLLMRunner``, its Python bindings: the runner its Android and iOS apps
use) loads the android ``.pte`` with the ``tokenizer.json`` beside it, as an app would, and generates
greedily the tokens PyTorch does (fp32) and the project's runner does on the same program (int4)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from slm_export.cli import main
from slm_export.runner.pte_run import PteDecoder
from tests.conftest import make_tiny_model

PROMPT = "The method returns a new object of the class"
NEW_TOKENS = 12
EOS = 0  # the tiny models' end token (tests/conftest.py)


def _bindings() -> Any:
    try:
        # The program calls llama::update_cache / custom_sdpa: importing ExecuTorch's custom ops registers
        # their kernels with the runtime the runner shares.
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
        from executorch.extension.llm import runner
    except Exception as exc:  # noqa: BLE001 - any failure to import is the reason to skip
        pytest.skip(f"ExecuTorch's LLM runner bindings do not import: {exc}")
    return runner


def _piece(tokenizer: Any, token: int) -> str:
    return tokenizer.backend_tokenizer.decode([token], skip_special_tokens=False)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama, with the rows of the tokens whose text alone is not valid UTF-8 (the byte-level
    BPE's single bytes 0x80-0xff) scaled down so that greedy never picks them. The bindings hand each
    generated token to Python as a ``str`` and raise on such a piece; the C++ runner does not care. The
    head is tied to the embedding, so those rows are small in both; the prompt does not use them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_tiny_model("llama", tmp_path_factory.mktemp("runner") / "llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    bad = [t for t in range(len(tokenizer)) if "\ufffd" in _piece(tokenizer, t)]
    assert 100 < len(bad) < 200
    with torch.no_grad():
        model.get_input_embeddings().weight[bad] *= 1e-3
    model.save_pretrained(folder)
    assert not set(bad) & set(tokenizer(PROMPT).input_ids)
    return folder


def _android(model: Path, out: Path, *extra: str) -> dict[str, Any]:
    code = main(["--target", "android", "--model", str(model), "--out", str(out), "--calib-samples", "4",
                 "--calib-seqlen", "64", "--no-validate", "--json", *extra])
    assert code == 0
    return json.loads((out / "report.json").read_text())


def _runner_pieces(out: Path) -> tuple[list[str], int]:
    """The pieces ExecuTorch's runner generates from PROMPT (temperature 0), and its prompt token count."""
    bindings = _bindings()
    runner = bindings.TextLLMRunner(str(out / "model.pte"), str(out / "tokenizer.json"))
    pieces: list[str] = []
    stats: list[Any] = []
    config = bindings.GenerationConfig(max_new_tokens=NEW_TOKENS, temperature=0.0, echo=False)
    runner.generate(PROMPT, config, pieces.append, stats.append)
    return pieces, stats[0].num_prompt_tokens


def test_runner_reads_the_metadata_and_generates_pytorchs_fp32_greedy(llama: Path, tmp_path: Path) -> None:
    import torch
    from executorch.runtime import Runtime
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _bindings()
    out = tmp_path / "fp32"
    report = _android(llama, out, "--precision", "fp32")
    et = report["backends"][0]
    assert (et["backend"], et["status"]) == ("executorch", "done")
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(et["files"])
    assert (out / "tokenizer.json").read_bytes() == (out / "tokenizer" / "tokenizer.json").read_bytes()
    program = Runtime.get().load_program(out / "model.pte")
    values = {name: program.load_method(name).execute([]) for name in program.method_names if name != "forward"}
    max_len = report["plan"]["max_seq_len"]
    assert values == {"get_max_seq_len": [max_len], "get_max_context_len": [max_len], "get_vocab_size": [384],
                      "use_kv_cache": [True], "use_sdpa_with_kv_cache": [True], "enable_dynamic_shape": [True],
                      "get_n_layers": [2], "get_bos_id": [0], "get_eos_ids": [EOS]}
    assert et["details"]["metadata_methods"]["get_eos_ids"] == [EOS]

    tokenizer = AutoTokenizer.from_pretrained(llama)
    ids = tokenizer(PROMPT).input_ids
    model = AutoModelForCausalLM.from_pretrained(llama).eval()
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=EOS,
                             pad_token_id=1)[0, len(ids):].tolist()
    pieces, prompt_tokens = _runner_pieces(out)
    assert prompt_tokens == len(ids)  # the runner's tokenizer read the same ids from the text
    # one piece per generated token; a byte-level BPE's pieces are distinct, so equal pieces = equal ids
    assert pieces == [_piece(tokenizer, t) for t in ref]
    assert len(set(ref)) > 2  # not one token repeated: the comparison says something


def test_runner_generates_the_project_runners_int4_greedy_on_the_same_pte(llama: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    _bindings()
    out = tmp_path / "int4"
    report = _android(llama, out)  # the profile's default: int4, 8da4w
    assert report["plan"]["precision"] == "int4"
    tokenizer = AutoTokenizer.from_pretrained(llama)
    ids = tokenizer(PROMPT).input_ids
    ours, _ = PteDecoder(out / "model.pte", 1).generate(ids, NEW_TOKENS, eos_token_id=EOS)
    pieces, prompt_tokens = _runner_pieces(out)
    assert prompt_tokens == len(ids)
    assert pieces == [_piece(tokenizer, t) for t in ours]
    assert len(set(ours)) > 2
