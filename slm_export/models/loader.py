"""Load a model into one immutable ``LoadedModel``: config, tokenizer and float32 weights.

Weights are held once: the PyTorch reference module (built on demand) shares their memory.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slm_export.errors import ModelLoadError
from slm_export.models.builtin import BUILTIN_MODELS

log = logging.getLogger(__name__)

DECODER_TYPES = ("llama", "mistral", "qwen2", "phi3", "gemma", "gpt2")
ENCODER_TYPES = ("bert",)


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model. ``weights`` uses Hugging Face parameter names, float32, shared memory."""

    name: str
    path: str
    fmt: str  # "gguf" or "hf"
    kind: str  # "decoder" or "encoder"
    config: Any
    tokenizer: Any
    weights: Mapping[str, Any]
    fingerprint: str
    _module: list[Any] = field(default_factory=list, repr=False, compare=False)

    @property
    def model_type(self) -> str:
        return str(self.config.model_type)

    @property
    def weight_bytes(self) -> int:
        """Bytes of float32 weights (tied tensors counted once)."""
        seen: set[int] = set()
        total = 0
        for t in self.weights.values():
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    def torch_module(self) -> Any:
        """The PyTorch float32 reference, built once, sharing ``weights``' memory."""
        if not self._module:
            self._module.append(_build_module(self))
        return self._module[0]


def load_model(ref: str) -> LoadedModel:
    """Load a built-in name, a GGUF file or a Hugging Face folder.

    Raises:
        ModelLoadError: missing, truncated, corrupt or unsupported model, with which and why.
    """
    name = ref
    if ref in BUILTIN_MODELS and not os.path.exists(ref):
        path = BUILTIN_MODELS.get(ref).path()
        name = BUILTIN_MODELS.canonical(ref)
    else:
        path = Path(ref).expanduser()
        if not path.exists():
            raise ModelLoadError(
                f"model {ref!r} not found: no such file or folder, and not a built-in model "
                f"(built-ins: {', '.join(BUILTIN_MODELS.names())})"
            )
    _quiet_transformers()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path}: a model file must be GGUF (.gguf); otherwise pass the model folder")
        return _load_gguf(name, path)
    return _load_hf_folder(name, path)


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def _kind_of(config: Any, where: Path) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type in DECODER_TYPES:
        return "decoder"
    if model_type in ENCODER_TYPES:
        return "encoder"
    raise ModelLoadError(
        f"{where}: architecture {model_type!r} is not supported. Supported decoders: "
        f"{', '.join(DECODER_TYPES)}; encoders: {', '.join(ENCODER_TYPES)}."
    )


def _check_gguf_file(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (its first bytes are {magic!r}, not b'GGUF')")
    if size < 1024:
        raise ModelLoadError(f"{path} is truncated ({size} bytes)")


def _load_gguf(name: str, path: Path) -> LoadedModel:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from slm_export.models.gguf import gguf_config, gguf_weights, read_gguf

    _check_gguf_file(path)
    # The readers raise ModelLoadError for every fault they know (the fuzz tests hold them to it); anything
    # else is still a damaged file to the user, so it is wrapped and named rather than called internal.
    try:
        meta, infos, mm, start = read_gguf(path)
        cfg = gguf_config(meta, infos)
    except ModelLoadError as exc:
        raise _named(exc, path) from None
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read GGUF (truncated or corrupt?): {type(exc).__name__}: {exc}") from None
    try:
        config = AutoConfig.for_model(**cfg)
    except Exception as exc:
        raise ModelLoadError(f"{path}: transformers rejects the configuration this GGUF describes: "
                             f"{type(exc).__name__}: {str(exc)[:300]}") from None
    kind = _kind_of(config, path)
    shapes, params, rows = _expected_shapes(config, kind, path)
    try:
        arrays = gguf_weights(path, meta, infos, mm, start, cfg)
    except ModelLoadError as exc:
        raise _named(exc, path) from None
    except Exception as exc:  # as above: numpy errors the checks did not foresee
        raise ModelLoadError(f"{path}: cannot read GGUF (truncated or corrupt?): {type(exc).__name__}: {exc}") from None
    weights = {k: torch.from_numpy(v) for k, v in arrays.items()}
    _check_shapes(weights, shapes, path, config, "the GGUF metadata")
    lacking = sorted(set(params) - set(weights))
    if lacking:
        raise ModelLoadError(f"{path}: the GGUF lacks weights for {', '.join(lacking[:5])}"
                             f"{' ...' if len(lacking) > 5 else ''}: not a complete model")
    _check_finite(weights, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # transformers' GGUF reader on a damaged vocabulary; tokenizers' Rust panics
        raise ModelLoadError(f"{path}: cannot build the tokenizer from the GGUF's vocabulary: "
                             f"{type(exc).__name__}: {str(exc)[:300]}") from None
    check_tokenizer(tokenizer, rows, path)
    return LoadedModel(name, str(path), "gguf", kind, config, tokenizer, weights, _fingerprint([path]))


def _named(exc: ModelLoadError, path: Path) -> ModelLoadError:
    """``exc`` with the file's path in front unless it already names it."""
    text = str(exc)
    return ModelLoadError(text if str(path) in text else f"{path}: {text}")


# What transformers' tokenizers read: a tokenizers JSON, a sentencepiece model, a WordPiece or a BPE vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "sentencepiece.model", "spm.model", "vocab.txt", "tokenizer.tiktoken", "qwen.tiktoken")
TOKENIZER_PAIRS = (("vocab.json", "merges.txt"),)
# A plain ASCII line that every real tokenizer encodes into several tokens and decodes back.
TOKENIZER_SAMPLE = "Hello world, this is a test 123."


def _tokenizer_files(path: Path) -> None:
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
_OPTIONAL_FOR = {"gpt2": ("intermediate_size",)}  # GPT-2's n_inner defaults to 4 x n_embd by definition


def _check_config_fields(raw: dict[str, Any], config: Any, path: Path) -> None:
    alias = dict(getattr(type(config), "attribute_map", {}) or {})
    for key in _REQUIRED_FIELDS:
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


def _expected_shapes(config: Any, kind: str, path: Path) -> tuple[dict[str, tuple[int, ...]], list[str], int]:
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


def _check_shapes(found: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], where: Path | str,
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


def _check_finite(weights: Mapping[str, Any], where: Path | str) -> None:
    """Refuse NaN or Inf in a weight: every output of the model would be NaN, yet it would export."""
    import numpy as np

    seen: set[int] = set()
    for key, t in weights.items():
        if not t.is_floating_point() or t.data_ptr() in seen:
            continue
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


def _load_hf_folder(name: str, path: Path) -> LoadedModel:
    import json

    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from slm_export.models.safetensors_check import check_safetensors

    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path}: no config.json; a Hugging Face model folder needs config.json, "
                             "weights (*.safetensors or pytorch_model.bin) and tokenizer files")
    weight_files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not weight_files:
        raise ModelLoadError(f"{path}: no weights (*.safetensors or pytorch_model*.bin)")
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelLoadError(f"{path}/config.json is not readable JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}/config.json must hold a JSON object, not {type(raw).__name__}")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"{path}/config.json is unreadable: {exc}") from None
    kind = _kind_of(config, path)
    _check_config_fields(raw, config, path)
    _tokenizer_files(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # tokenizers' Rust panics (a merge naming no token) are BaseExceptions
        raise ModelLoadError(f"{path}: the tokenizer files cannot be read: {type(exc).__name__}: "
                             f"{str(exc)[:300]}") from None
    shapes, _, rows = _expected_shapes(config, kind, path)
    check_tokenizer(tokenizer, rows, path)
    # Headers before transformers: it trusts their dtypes, and would allocate the model before a shape fails.
    for f in weight_files:
        if f.suffix == ".safetensors":
            _check_shapes({k: e.shape for k, e in check_safetensors(f).items()}, shapes, f, config)
    auto = AutoModelForCausalLM if kind == "decoder" else AutoModel
    try:
        module, info = auto.from_pretrained(path, dtype=torch.float32, output_loading_info=True,
                                            ignore_mismatched_sizes=True)
    except Exception as exc:
        raise ModelLoadError(f"{path}: transformers cannot load the weights: "
                             f"{type(exc).__name__}: {str(exc)[:400]}") from None
    mismatched = list(info.get("mismatched_keys", []))
    if mismatched:  # names the checkpoint's own spelling did not let the header check above match
        key, have, want = mismatched[0]
        raise ModelLoadError(f"{path}: tensor {key} has shape {list(have)} but config.json implies {list(want)}: "
                             "the weights and config.json are of different models")
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise ModelLoadError(f"{path}: the checkpoint lacks {', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''}; transformers would fill them with random "
                             "values")
    module.eval()
    weights = dict(module.state_dict())
    _check_finite(weights, path)
    loaded = LoadedModel(name, str(path), "hf", kind, config, tokenizer, weights, _fingerprint(weight_files))
    loaded._module.append(module)
    return loaded


def _build_module(model: LoadedModel) -> Any:
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if model.kind == "decoder" else AutoModel
    # Parameters on the meta device (then assigned from ``weights``, no copy); buffers real.
    with init_empty_weights(include_buffers=False):
        module = auto.from_config(model.config)
    missing, _ = module.load_state_dict(dict(model.weights), strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        module.tie_weights()
        missing = [k for k in missing if not k.startswith("lm_head.")]
    if missing:
        raise ModelLoadError(f"{model.path}: weights missing for {missing[:5]}")
    return module.eval()
