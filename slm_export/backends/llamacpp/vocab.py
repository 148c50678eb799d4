"""The tokenizer as llama.cpp reads it: ``tokenizer.ggml.*`` and ``tokenizer.chat_template``.

A GGUF source keeps its own tokenizer metadata, copied key by key. A Hugging Face tokenizer must be a
byte-level BPE (``tokenizer.json`` of model type BPE over a ByteLevel alphabet): its tokens in id order,
padded to the embedding's rows as llama.cpp's converter does (``[PAD{id}]``, unused), its merges, a type per
token (added special tokens are control tokens, other added tokens user-defined, the rest normal), the
special ids, whether encoding adds BOS/EOS, the chat template, and the name of llama.cpp's pre-tokenizer that
splits text the way this tokenizer does (``tokenizer.ggml.pre``; llama.cpp's ``llm_tokenizer_bpe`` holds the
regexes, convert_hf_to_gguf.py's ``get_vocab_base_pre`` the names). A pre-tokenizer with no llama.cpp
equivalent is refused: llama.cpp would cut the text differently, and every prompt would differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slm_export.errors import CompileError

# The split patterns of tokenizer.json files, as llama.cpp's llama-vocab.cpp quotes them ("original regex").
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
# The pre-tokenizer's steps -> llama.cpp's name for the same split (and whether merges are ignored).
PRE_TOKENIZERS: dict[tuple[str, ...], tuple[str, bool]] = {
    ("byte-level+gpt2-regex",): ("gpt-2", False),
    ("digits", "byte-level+gpt2-regex"): ("smollm", False),
    (f"split:{QWEN2_SPLIT}", "byte-level"): ("qwen2", False),
    (f"split:{LLAMA3_SPLIT}", "byte-level"): ("llama-bpe", True),
}
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # gguf.TokenType


@dataclass(frozen=True)
class Entry:
    """One metadata key with its GGUF value type names (``gguf.GGUFValueType``), the array's element type too."""

    key: str
    value: Any
    vtype: str
    sub_type: str | None = None


def from_gguf(path: Path) -> list[Entry]:
    """Every ``tokenizer.*`` key of a GGUF source, as the file has it."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = []
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            types = [t.name for t in field.types]
            out.append(Entry(key, field.contents(), types[0], types[1] if len(types) > 1 else None))
    return out


def _step(step: dict[str, Any]) -> str:
    kind = step.get("type")
    if kind == "ByteLevel" and not step.get("add_prefix_space", False):
        return "byte-level+gpt2-regex" if step.get("use_regex", True) else "byte-level"
    if kind == "Digits" and step.get("individual_digits"):
        return "digits"
    if kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
        return "split:" + str((step.get("pattern") or {}).get("Regex"))
    return json.dumps(step, sort_keys=True)[:200]


def pre_tokenizer(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer of ``spec`` (a tokenizer.json), or CompileError saying why none."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    sig = tuple(_step(s) for s in steps)
    if sig not in PRE_TOKENIZERS:
        raise CompileError(f"the tokenizer's pre-tokenizer ({', '.join(sig)[:300]}) has no llama.cpp equivalent "
                           f"among {', '.join(n for n, _ in PRE_TOKENIZERS.values())}: llama.cpp would split text "
                           "differently, so no GGUF is written")
    name, ignore_merges = PRE_TOKENIZERS[sig]
    if bool(spec["model"].get("ignore_merges")) != ignore_merges:
        raise CompileError(f"the tokenizer {'does not ignore' if ignore_merges else 'ignores'} merges for whole "
                           f"words, unlike llama.cpp's {name!r} pre-tokenizer: no GGUF is written")
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise CompileError(f"the tokenizer normalizes text ({normalizer.get('type')}); llama.cpp's byte-level BPE "
                           "does not: no GGUF is written")
    return name


def _bpe_model(spec: dict[str, Any]) -> dict[str, Any]:
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        raise CompileError("the tokenizer is not a byte-level BPE (tokenizer.json model type BPE, no byte fallback, "
                           "no word prefixes or suffixes); this version writes GGUF vocabularies of that kind only "
                           "(tokenizer.ggml.model gpt2)")
    return model


def _merges(model: dict[str, Any]) -> list[str]:
    """Merges as llama.cpp stores them, "left right"; a space inside a part is shifted by 256 (to U+0120, the
    byte-level alphabet's space), as the gguf package's SpecialVocab does."""
    out = []
    for m in model.get("merges", []):
        parts = m.split(" ") if isinstance(m, str) else list(m)
        out.append(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in p) for p in parts))
    return out


def _tokens(spec: dict[str, Any], model: dict[str, Any], rows: int) -> tuple[list[str], list[int]]:
    tokens: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types = dict.fromkeys(tokens, NORMAL)
    for added in spec.get("added_tokens", []):
        tokens[int(added["id"])] = added["content"]
        types[int(added["id"])] = CONTROL if added.get("special") else USER_DEFINED
    beyond = [i for i in tokens if not 0 <= i < rows]
    if beyond:
        raise CompileError(f"the tokenizer has token id {max(beyond)}, beyond the model's {rows} embedding rows")
    names = [tokens.get(i, f"[PAD{i}]") for i in range(rows)]
    return names, [types.get(i, UNUSED) for i in range(rows)]


def _adds(tokenizer: Any, token_id: int | None, first: bool) -> bool:
    """Whether encoding adds ``token_id`` at the start (``first``) or the end of the text."""
    if token_id is None:
        return False
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    if len(full) <= len(plain):
        return False
    return full[0] == token_id if first else full[-1] == token_id


def _special_ids(tokenizer: Any, config: Any) -> dict[str, int]:
    ids: dict[str, int] = {}
    for kind in ("bos", "eos", "unk", "pad"):
        value = getattr(tokenizer, f"{kind}_token_id", None)
        if value is None and kind in ("bos", "eos", "pad"):
            value = getattr(config, f"{kind}_token_id", None)
        if isinstance(value, list | tuple):
            value = value[0] if value else None
        if value is not None:
            ids[kind] = int(value)
    # A byte-level BPE never produces an unknown token, and llama.cpp's BPE tokenizer does not read this id; but
    # transformers' GGUF reader invents a token ("<|endoftext|>") for a file without one, one row past the
    # embedding. Naming an existing token (EOS, as the built-in smollm2 GGUF's id 0 is) keeps the vocabulary whole.
    if "unk" not in ids and "eos" in ids:
        ids["unk"] = ids["eos"]
    return ids


def from_hf(tokenizer: Any, config: Any, rows: int) -> list[Entry]:
    """The ``tokenizer.*`` keys for a Hugging Face fast tokenizer (CompileError when it cannot be written)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CompileError("the tokenizer has no fast (tokenizer.json) form; GGUF vocabularies are written from one")
    spec = json.loads(backend.to_str())
    model = _bpe_model(spec)
    pre = pre_tokenizer(spec)
    names, types = _tokens(spec, model, rows)
    out = [Entry("tokenizer.ggml.model", "gpt2", "STRING"), Entry("tokenizer.ggml.pre", pre, "STRING"),
           Entry("tokenizer.ggml.tokens", names, "ARRAY", "STRING"),
           Entry("tokenizer.ggml.token_type", types, "ARRAY", "INT32"),
           Entry("tokenizer.ggml.merges", _merges(model), "ARRAY", "STRING")]
    ids = _special_ids(tokenizer, config)
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}
    out += [Entry(f"tokenizer.ggml.{keys[k]}", v, "UINT32") for k, v in ids.items() if 0 <= v < rows]
    out.append(Entry("tokenizer.ggml.add_bos_token", _adds(tokenizer, ids.get("bos"), True), "BOOL"))
    out.append(Entry("tokenizer.ggml.add_eos_token", _adds(tokenizer, ids.get("eos"), False), "BOOL"))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        out.append(Entry("tokenizer.chat_template", template, "STRING"))
    return out


def tokenizer_entries(model: Any, rows: int) -> list[Entry]:
    """The tokenizer metadata for ``model`` (a LoadedModel): copied from a GGUF source, else converted."""
    if getattr(model, "fmt", None) == "gguf":
        return from_gguf(Path(model.path))
    return from_hf(model.tokenizer, model.config, rows)
