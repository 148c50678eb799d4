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
    try:
        meta, infos, mm, start = read_gguf(path)
        cfg = gguf_config(meta, infos)
        config = AutoConfig.for_model(**cfg)
        kind = _kind_of(config, path)
        arrays = gguf_weights(path, meta, infos, mm, start, cfg)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ModelLoadError:
        raise
    except Exception as exc:  # struct/numpy/tokenizer errors on a damaged file
        raise ModelLoadError(f"{path}: cannot read GGUF (truncated or corrupt?): {type(exc).__name__}: {exc}") from None
    weights = {k: torch.from_numpy(v) for k, v in arrays.items()}
    return LoadedModel(name, str(path), "gguf", kind, config, tokenizer, weights, _fingerprint([path]))


def _load_hf_folder(name: str, path: Path) -> LoadedModel:
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path}: no config.json; a Hugging Face model folder needs config.json, "
                             "weights (*.safetensors or pytorch_model.bin) and tokenizer files")
    weight_files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not weight_files:
        raise ModelLoadError(f"{path}: no weights (*.safetensors or pytorch_model*.bin)")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"{path}/config.json is unreadable: {exc}") from None
    kind = _kind_of(config, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"{path}: no usable tokenizer files (tokenizer.json or vocab): {exc}") from None
    auto = AutoModelForCausalLM if kind == "decoder" else AutoModel
    try:
        module = auto.from_pretrained(path, dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(f"{path}: weights are truncated, corrupt or do not match config.json: "
                             f"{type(exc).__name__}: {str(exc)[:400]}") from None
    module.eval()
    weights = dict(module.state_dict())
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
