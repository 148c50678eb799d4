"""Shared fixtures: tiny seeded models of every supported architecture, built in memory (no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Each of the suite's workers (scripts/test.sh) gets its share of the cores for torch's and OpenMP's pools, in
# this process and the ones it starts: two workers at torch's default of a thread per core each wait on each
# other's descheduled threads, several times slower than one thread each (the real-model tests pass the same
# share as --threads: tests/integration/helpers.py).
WORKER_THREADS = max(1, (os.cpu_count() or 2) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
os.environ.setdefault("OMP_NUM_THREADS", str(WORKER_THREADS))


@pytest.fixture(scope="session", autouse=True)
def _worker_threads() -> None:
    import torch

    torch.set_num_threads(WORKER_THREADS)

VOCAB = 384
TINY_DECODERS = ("llama", "mistral", "qwen2", "phi3", "gemma", "gpt2")


def _tokenizer(folder: Path):  # type: ignore[no-untyped-def]
    """A byte-level BPE tokenizer trained on the built-in text: small, deterministic."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [topics[k] for k in sorted(topics)[:40]]
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast


def tiny_config(arch: str):  # type: ignore[no-untyped-def]
    import transformers as t

    common = {"vocab_size": VOCAB, "eos_token_id": 0, "pad_token_id": 1, "bos_token_id": 0}
    llama_like = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "max_position_embeddings": 512, "initializer_range": 0.2, **common}
    if arch == "llama":
        return t.LlamaConfig(**llama_like, tie_word_embeddings=True)
    if arch == "mistral":
        return t.MistralConfig(**llama_like, tie_word_embeddings=False, sliding_window=None)
    if arch == "qwen2":
        return t.Qwen2Config(**llama_like, tie_word_embeddings=False)
    if arch == "phi3":
        return t.Phi3Config(**llama_like, tie_word_embeddings=False)
    if arch == "gemma":
        return t.GemmaConfig(**{**llama_like, "num_key_value_heads": 1}, head_dim=32)
    if arch == "gpt2":
        return t.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, initializer_range=0.2, **common)
    if arch == "bert":
        return t.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            max_position_embeddings=512, vocab_size=VOCAB, pad_token_id=1)
    raise ValueError(arch)


def make_tiny_model(arch: str, folder: Path) -> Path:
    """Save a seeded random model of ``arch`` with a tokenizer into ``folder``."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    _tokenizer(folder)
    torch.manual_seed(0)
    config = tiny_config(arch)
    auto = AutoModel if arch == "bert" else AutoModelForCausalLM
    model = auto.from_config(config)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(arch, root / arch) for arch in (*TINY_DECODERS, "bert")}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Host-profile measurements are cached per session, outside the user's home."""
    cache = tmp_path_factory.getbasetemp() / "slm-cache"
    monkeypatch.setenv("SLM_EXPORT_CACHE_DIR", str(cache))


def run_cli(argv: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``slm-export ARGV`` in-process: its exit code (argparse's own exit 2 included) and everything it printed."""
    from slm_export.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err
