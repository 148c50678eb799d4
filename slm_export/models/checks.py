"""Checks on a model before it is trusted: tokenizer files present and usable, the config fields an architecture
needs, tensor shapes against the config, finite weights. Each refusal names the file, the field or the tensor."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from slm_export.errors import ModelLoadError

log = logging.getLogger(__name__)


# What transformers' tokenizers read: a tokenizers JSON, a sentencepiece model, a WordPiece or a BPE vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "sentencepiece.model", "spm.model", "vocab.txt", "tokenizer.tiktoken", "qwen.tiktoken")
TOKENIZER_PAIRS = (("vocab.json", "merges.txt"),)
# A plain ASCII line that every real tokenizer encodes into several tokens and decodes back.
TOKENIZER_SAMPLE = "Hello world, this is a test 123."


def tokenizer_files(path: Path) -> None:
    """Refuse a folder without tokenizer files: transformers would build a tokenizer that knows no words."""
    if any((path / f).is_file() for f in TOKENIZER_FILES):
        return
    if any(all((path / f).is_file() for f in pair) for pair in TOKENIZER_PAIRS):
        return
    looked = ", ".join((*TOKENIZER_FILES, *(" + ".join(pair) for pair in TOKENIZER_PAIRS)))
    raise ModelLoadError(f"{path}: no tokenizer files (looked for {looked}); copy the tokenizer the model was "
                         "trained with into the folder")


def check_tokenizer(tokenizer: Any, rows: int, where: Path | str) -> None:
    """Refuse a tokenizer that cannot serve the model: it must round-trip a plain sample into at least two
    distinct tokens, and emit no id the embedding has no row for.

    The comparison ignores whitespace and case, which real tokenizers normalise (BERT lower-cases, byte-level
    BPE may add a leading space).
    """
    try:
        ids = list(tokenizer.encode(TOKENIZER_SAMPLE, add_special_tokens=False))
        text = tokenizer.decode(ids, skip_special_tokens=True)
        size = len(tokenizer)
        special = {int(i) for i in tokenizer.all_special_ids if i is not None}
        added = {int(i): str(t) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        used = {int(i) for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
                if i is not None}
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # a tokenizer transformers built but cannot run; Rust panics included
        raise ModelLoadError(f"{where}: the tokenizer fails on the sample {TOKENIZER_SAMPLE!r}: "
                             f"{type(exc).__name__}: {str(exc)[:300]}") from None

    def squash(t: str) -> str:
        return "".join(str(t).split()).casefold()

    if squash(text) != squash(TOKENIZER_SAMPLE):
        raise ModelLoadError(f"{where}: the tokenizer does not round-trip plain text: {TOKENIZER_SAMPLE!r} "
                             f"encodes to {ids[:12]} and decodes as {str(text)[:80]!r}; it is not the tokenizer "
                             "of this model, or is damaged")
    if len(set(ids)) < 2:
        raise ModelLoadError(f"{where}: the tokenizer encodes {TOKENIZER_SAMPLE!r} as {len(set(ids))} distinct "
                             "token(s); a working tokenizer splits it into several")
    # Special tokens a tokenizer class adds by default (Qwen2's <|endoftext|> as unk) appear only where the
    # text spells them out; they are a warning unless they are the bos, eos or pad the model is fed.
    beyond = sorted(i for i in range(rows, size) if not (i in special and i in added and i not in used))
    if beyond or max(ids) >= rows or any(i >= rows for i in used):
        raise ModelLoadError(f"{where}: the tokenizer has {max(size, max(ids) + 1)} tokens but the model's "
                             f"embedding has {rows} rows: ids from {rows} up would index past it; use the "
                             "tokenizer this model was trained with")
    if size > rows:
        log.warning("%s: the tokenizer's special token(s) %s have ids past the model's %d embedding rows; text "
                    "that spells them out cannot be run", where, ", ".join(added[i] for i in range(rows, size)),
                    rows)


# config.json fields every supported architecture needs (transformers would silently use a default otherwise).
_REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
# GPT-2's n_inner defaults to 4 x n_embd by definition; OPT names its MLP width ffn_dim (checked instead).
_OPTIONAL_FOR = {"gpt2": ("intermediate_size",), "opt": ("intermediate_size",)}
_EXTRA_FOR = {"opt": ("ffn_dim",)}
# Spellings a config class does not map itself (its attribute_map covers the others: DistilBERT's dim, n_layers).
_SPELT_AS = {"distilbert": {"intermediate_size": "hidden_dim"}}


def check_config_fields(raw: dict[str, Any], config: Any, path: Path) -> None:
    alias = {**(getattr(type(config), "attribute_map", {}) or {}), **_SPELT_AS.get(config.model_type, {})}
    for key in (*_REQUIRED_FIELDS, *_EXTRA_FOR.get(config.model_type, ())):
        if key in _OPTIONAL_FOR.get(config.model_type, ()):
            continue
        names = [alias[key], key] if key in alias else [key]
        present = [n for n in names if n in raw]
        if not present:
            spelt = f"{names[0]} ({key})" if len(names) > 1 else key
            raise ModelLoadError(f"{path}/config.json lacks {spelt}, which a {config.model_type} model needs; "
                                 "restore it from the model's original config.json")
        value = raw[present[0]]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelLoadError(f"{path}/config.json: {present[0]} is {str(value)[:80]}; expected a positive "
                                 "integer")


def expected_shapes(config: Any, kind: str, path: Path) -> tuple[dict[str, tuple[int, ...]], list[str], int]:
    """Build the architecture on the meta device (no memory): every tensor's shape as the config implies,
    the parameter names (tied copies once) and the embedding's rows."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if kind == "decoder" else AutoModel
    try:
        with torch.device("meta"):
            module = auto.from_config(config)
        rows = int(module.get_input_embeddings().weight.shape[0])
    except Exception as exc:  # e.g. a hidden size that does not split into the heads
        raise ModelLoadError(f"{path}: the configuration describes a model transformers cannot build: "
                             f"{type(exc).__name__}: {str(exc)[:300]}") from None
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    params = [k for k, _ in module.named_parameters()]
    prefix = getattr(module, "base_model_prefix", "") or ""
    if prefix:  # checkpoints of the bare base model name its tensors without the prefix, and vice versa
        for k in list(shapes):
            if k.startswith(prefix + "."):
                shapes.setdefault(k[len(prefix) + 1:], shapes[k])
            else:
                shapes.setdefault(f"{prefix}.{k}", shapes[k])
    return shapes, params, rows


def check_shapes(found: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], where: Path | str,
                  config: Any, source: str = "config.json") -> None:
    """Each tensor whose name the architecture knows must have the shape the config implies."""
    for key, value in found.items():
        want = shapes.get(key)
        have = tuple(value.shape) if not isinstance(value, tuple) else value
        if want is not None and have != want:
            implied = ", ".join(f"{f} {getattr(config, f)}" for f in ("vocab_size", "hidden_size", "intermediate_size")
                                if isinstance(getattr(config, f, None), int))
            raise ModelLoadError(f"{where}: tensor {key} has shape {list(have)} but {source} implies "
                                 f"{list(want)} ({implied}): the weights and {source} are of different models")


def check_finite(weights: Mapping[str, Any], where: Path | str) -> None:
    """Refuse NaN or Inf in a weight: every output of the model would be NaN, yet it would export."""
    import numpy as np

    seen: set[int] = set()
    # A streamed model's tensors are read afresh each time (a freed one's address comes back): each once.
    unique = getattr(weights, "unique_keys", None)
    for key in (unique() if unique else weights):
        t = weights[key]
        if not t.is_floating_point() or t.data_ptr() in seen:
            continue
        if not unique:
            seen.add(t.data_ptr())
        t = t.detach().cpu()
        # numpy: one thread and no dispatch cost per tensor (torch's pool stalls when the cores are shared).
        arr = t.numpy() if t.dtype.itemsize >= 4 else t.float().numpy()
        with np.errstate(over="ignore", invalid="ignore"):
            # A finite sum proves every element finite (NaN and Inf propagate); only a non-finite sum, from a
            # bad value or an overflow of huge ones, needs the element-wise test.
            if np.isfinite(arr.sum()) or np.isfinite(arr).all():
                continue
            bad = int(arr.size - np.isfinite(arr).sum())
        raise ModelLoadError(f"{where}: weight {key} holds {bad} NaN or Inf value(s) of {arr.size}: the checkpoint "
                             "is damaged; a model with them computes NaN")
