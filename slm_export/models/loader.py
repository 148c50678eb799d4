"""Load a model into one immutable ``LoadedModel``: config, tokenizer and float32 weights.

Weights are held once: the PyTorch reference module (built on demand) shares their memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from slm_export.errors import ConfigError, ModelLoadError
from slm_export.models import checks, decoders, encoders
from slm_export.models.builtin import BUILTIN_MODELS
from slm_export.models.hub import HubSource, parse_hub_id, resolve_hub_id
from slm_export.models.lazy import STREAM_SHARE, LazyWeights, lazy_weights, streamed_module, total_memory

log = logging.getLogger(__name__)

DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "smollm3", "olmo2",
                 "granite", "phi", "gpt_neox", "opt", "stablelm", "gpt2")
ENCODER_TYPES = ("bert", "distilbert", "roberta", "xlm-roberta", "mobilebert")


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
    hub: HubSource | None = None  # the repository and commit when the model came by a hub id
    _module: list[Any] = field(default_factory=list, repr=False, compare=False)

    @property
    def model_type(self) -> str:
        return str(self.config.model_type)

    @property
    def streamed(self) -> bool:
        """The weights are read from the files at each access (``lazy.py``), not held."""
        return isinstance(self.weights, LazyWeights)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight's shape, without reading a streamed model's tensors."""
        if isinstance(self.weights, LazyWeights):
            return {k: self.weights.shape(k) for k in self.weights}
        return {k: tuple(t.shape) for k, t in self.weights.items()}

    @property
    def weight_bytes(self) -> int:
        """Bytes of float32 weights (tied tensors counted once)."""
        if isinstance(self.weights, LazyWeights):
            return self.weights.float32_bytes
        seen: set[int] = set()
        total = 0
        for t in self.weights.values():
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    def torch_module(self) -> Any:
        """The PyTorch float32 reference, built once, sharing ``weights``' memory; for a streamed model, a module
        whose layers read their weights when they run and drop them after (``streamed_module``)."""
        if not self._module:
            self._module.append(streamed_module(self) if self.streamed else build_module(self))
        return self._module[0]


def load_model(ref: str, stream: bool | None = None) -> LoadedModel:
    """Load a built-in name, a GGUF file, a Hugging Face folder, or a hub id (``org/name[@revision]``, through the
    Hub's cache: ``models/hub.py``). An existing path wins over a built-in name and a hub id of that spelling.

    ``stream``: read a safetensors model's weights from its files at each use instead of holding them
    (``lazy.py``); None: when its float32 weights exceed ``STREAM_SHARE`` of this machine's memory.

    Raises:
        ModelLoadError: missing, truncated, corrupt or unsupported model, with which and why.
        ConfigError: a malformed hub id, or one that is neither cached nor downloadable.
    """
    name = ref
    if ref in BUILTIN_MODELS and not os.path.exists(ref):
        path = BUILTIN_MODELS.get(ref).path()
        name = BUILTIN_MODELS.canonical(ref)
    elif (hub_id := parse_hub_id(ref)) is not None:
        source = resolve_hub_id(hub_id)
        _quiet_transformers()
        return replace(_load_hf_folder(hub_id.repo_id, Path(source.path), stream), hub=source)
    else:
        path = Path(ref).expanduser()
        if not path.exists():
            raise ModelLoadError(
                f"model {ref!r} not found: no such file or folder, and not a built-in model "
                f"(built-ins: {', '.join(BUILTIN_MODELS.names())}), nor a hub id (org/name[@revision])"
            )
    _quiet_transformers()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path}: a model file must be GGUF (.gguf); otherwise pass the model folder")
        return _load_gguf(name, path)
    return _load_hf_folder(name, path, stream)


BUILTIN_TYPES = {"smollm2-135m": "llama", "minilm-l6": "bert"}


def peek_model_type(ref: str) -> str | None:
    """The model's ``model_type`` from its config alone (no weights, no tokenizer), so the planner can fit its
    defaults to the model before any work; None when that cannot be told cheaply (a GGUF file, a hub id not
    fetched yet, a config that will be refused at load anyway)."""
    if ref in BUILTIN_MODELS:
        return BUILTIN_TYPES.get(BUILTIN_MODELS.get(ref).name)
    config = Path(ref).expanduser() / "config.json"
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    return kind if isinstance(kind, str) else None


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
        cfg = gguf_config(meta, infos, (mm, start))
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
    shapes, params, rows = checks.expected_shapes(config, kind, path)
    try:
        arrays = gguf_weights(path, meta, infos, mm, start, cfg)
    except ModelLoadError as exc:
        raise _named(exc, path) from None
    except Exception as exc:  # as above: numpy errors the checks did not foresee
        raise ModelLoadError(f"{path}: cannot read GGUF (truncated or corrupt?): {type(exc).__name__}: {exc}") from None
    weights = {k: torch.from_numpy(v) for k, v in arrays.items()}
    checks.check_shapes(weights, shapes, path, config, "the GGUF metadata")
    lacking = sorted(set(params) - set(weights))
    if lacking:
        raise ModelLoadError(f"{path}: the GGUF lacks weights for {', '.join(lacking[:5])}"
                             f"{' ...' if len(lacking) > 5 else ''}: not a complete model")
    checks.check_finite(weights, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # transformers' GGUF reader on a damaged vocabulary; tokenizers' Rust panics
        raise ModelLoadError(f"{path}: cannot build the tokenizer from the GGUF's vocabulary: "
                             f"{type(exc).__name__}: {str(exc)[:300]}") from None
    checks.check_tokenizer(tokenizer, rows, path)
    return LoadedModel(name, str(path), "gguf", kind, config, tokenizer, weights, _fingerprint([path]))


def _named(exc: ModelLoadError, path: Path) -> ModelLoadError:
    """``exc`` with the file's path in front unless it already names it."""
    text = str(exc)
    return ModelLoadError(text if str(path) in text else f"{path}: {text}")


def _load_hf_folder(name: str, path: Path, stream: bool | None = None) -> LoadedModel:
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    from slm_export.models.safetensors_check import check_safetensors

    weight_files = _hf_files(path)
    config, kind = _hf_config(path)
    tokenizer = _hf_tokenizer(path)
    shapes, _, rows = checks.expected_shapes(config, kind, path)
    checks.check_tokenizer(tokenizer, rows, path)
    # Headers before transformers: it trusts their dtypes, and would allocate the model before a shape fails.
    for f in weight_files:
        if f.suffix == ".safetensors":
            checks.check_shapes({k: e.shape for k, e in check_safetensors(f).items()}, shapes, f, config)
    auto = AutoModelForCausalLM if kind == "decoder" else AutoModel
    lazy = lazy_weights(config, kind, weight_files) if stream is not False else None
    if lazy is not None and (stream or lazy.float32_bytes > STREAM_SHARE * total_memory()):
        checks.check_finite(lazy, path)
        return LoadedModel(name, str(path), "hf", kind, config, tokenizer, lazy, _fingerprint(weight_files))
    try:
        module, info = auto.from_pretrained(path, dtype=torch.float32, output_loading_info=True,
                                            ignore_mismatched_sizes=True)
    except Exception as exc:
        raise ModelLoadError(f"{path}: transformers cannot load the weights: "
                             f"{type(exc).__name__}: {str(exc)[:400]}") from None
    _loading_info(info, path)
    module.eval()
    weights = dict(module.state_dict())
    checks.check_finite(weights, path)
    loaded = LoadedModel(name, str(path), "hf", kind, config, tokenizer, weights, _fingerprint(weight_files))
    loaded._module.append(module)
    return loaded


def _hf_files(path: Path) -> list[Path]:
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path}: no config.json; a Hugging Face model folder needs config.json, "
                             "weights (*.safetensors or pytorch_model.bin) and tokenizer files")
    weight_files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not weight_files:
        raise ModelLoadError(f"{path}: no weights (*.safetensors or pytorch_model*.bin)")
    return weight_files


def _hf_config(path: Path) -> tuple[Any, str]:
    import json

    from transformers import AutoConfig

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
    checks.check_config_fields(raw, config, path)
    try:
        (decoders if kind == "decoder" else encoders).check_config(config)
    except ConfigError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    return config, kind


def _hf_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    checks.tokenizer_files(path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # tokenizers' Rust panics (a merge naming no token) are BaseExceptions
        raise ModelLoadError(f"{path}: the tokenizer files cannot be read: {type(exc).__name__}: "
                             f"{str(exc)[:300]}") from None


def _loading_info(info: dict[str, Any], path: Path) -> None:
    """What transformers reports after loading: mismatched shapes and missing weights are refusals."""
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


def build_module(model: LoadedModel) -> Any:
    """The PyTorch module over ``model.weights`` (assigned, not copied): callers that change its parameters
    replace them, which leaves the weights mapping as it was."""
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

