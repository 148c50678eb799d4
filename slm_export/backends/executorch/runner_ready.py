"""What ExecuTorch's LLM runner (``TextLLMRunner``, the one its Android and iOS apps use) reads besides
``forward``: constant metadata methods in the ``.pte`` and a tokenizer file beside it.

The runner (``extension/llm/runner/llm_runner_helper.cpp``) refuses a program without
``get_max_seq_len``; it reads ``get_max_context_len``, ``use_kv_cache``, ``enable_dynamic_shape`` and
``use_sdpa_with_kv_cache`` from the program, and ``get_eos_ids`` (the set that stops generation, in
place of the tokenizer's own end token). Its vocabulary size and BOS id come from the tokenizer file;
the program carries ``get_vocab_size`` and ``get_bos_id`` too, as ExecuTorch's own exporter writes them,
for apps that read them. ``forward(tokens[1, S], input_pos[1]) -> logits[1, S, vocab]`` is what its
decoder runner calls: two inputs mean a KV cache, an ``input_pos`` of one element means "start
position", and it samples from the last row of 3-D logits.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

# Files of the exported tokenizer/ folder that go beside model.pte: the runner takes the path of a
# tokenizer.json (Hugging Face format); tokenizer_config.json names its special tokens.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def eos_ids(model: Any) -> list[int]:
    """The ids that end generation: the model config's (one or a list), else the tokenizer's end token;
    the same choice as the manifest's ``eos_token_id`` and PyTorch's ``generate``."""
    ids = _ids(getattr(model.config, "eos_token_id", None))
    return ids or _ids(getattr(model.tokenizer, "eos_token_id", None))


def bos_id(model: Any) -> int | None:
    for source in (model.config, model.tokenizer):
        ids = _ids(getattr(source, "bos_token_id", None))
        if ids:
            return ids[0]
    return None


def runner_metadata(model: Any, spec: Any, max_len: int) -> dict[str, Any]:
    """The constant methods of the ``.pte`` (name -> value), as ExecuTorch's own LLM exporter names them.

    ``max_len`` is the static KV cache's length: the longest prefill chunk (``get_max_seq_len``) and the
    whole context (``get_max_context_len``). The program's one ``forward`` takes a dynamic sequence
    length (``enable_dynamic_shape``: the runner prefills the prompt in one call) and writes the cache
    with ``llama::update_cache`` read by ``llama::custom_sdpa`` (``use_sdpa_with_kv_cache``, the flag
    ExecuTorch's exporter sets when it builds that pair).
    """
    head = spec.lm_head if spec.lm_head is not None else spec.embed
    meta: dict[str, Any] = {
        "get_max_seq_len": int(max_len),
        "get_max_context_len": int(max_len),
        "get_vocab_size": int(head.shape[0]),
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": True,
        "enable_dynamic_shape": True,
        "get_n_layers": len(spec.layers),
    }
    bos = bos_id(model)
    if bos is not None:
        meta["get_bos_id"] = bos
    eos = eos_ids(model)
    if eos:
        meta["get_eos_ids"] = eos
    return meta


def vocab_note(model: Any, metadata: dict[str, Any]) -> str:
    """A warning where the tokenizer knows more ids than the logits have rows: the runner sizes its sampler
    from the tokenizer and would read past the logits row."""
    try:
        ids = len(model.tokenizer)
    except TypeError:
        return ""
    rows = metadata["get_vocab_size"]
    if ids <= rows:
        return ""
    return (f"the tokenizer has {ids} ids and the logits {rows} rows: ExecuTorch's LLM runner, which samples "
            f"over the tokenizer's vocabulary, cannot run this .pte")


def place_tokenizer(artifact: Path) -> tuple[str, ...]:
    """Copy the exported tokenizer's files beside ``model.pte``; returns the names written."""
    written = []
    for name in TOKENIZER_FILES:
        src = artifact / "tokenizer" / name
        if src.is_file():
            shutil.copyfile(src, artifact / name)
            written.append(name)
    return tuple(written)
