"""A lean GGUF reader: a Hugging Face config and float32 weights under Hugging Face names from one GGUF file.

transformers' own GGUF path parses the file three times and maps names per module (about 17 s and
2.2x the weights in memory for SmolLM2-135M); this reads the header once and keeps one float32 copy.
The format lives in ``gguf_file`` (every declared size checked against the file's, so a damaged file ends in
a ModelLoadError naming it), each architecture's metadata and tensor names in ``gguf_families``.
"""

from __future__ import annotations

import mmap
import re
from pathlib import Path
from typing import Any

import numpy as np

from slm_export.errors import ModelLoadError
from slm_export.models.gguf_families import FAMILIES, TOP_NAMES, Family, Meta, TensorReader, rope_scaling
from slm_export.models.gguf_file import ArrayCount, GgufTensorInfo, dequantize, read_gguf
from slm_export.models.gguf_rope import llama3_rope

__all__ = ["GGUF_ARCHITECTURES", "ArrayCount", "GgufTensorInfo", "gguf_config", "gguf_weights", "read_gguf"]

GGUF_ARCHITECTURES = tuple(FAMILIES)
_BLOCK = re.compile(r"blk\.(\d{1,9})\.(\w+)\.(weight|bias)")


def gguf_config(meta: dict[str, Any], infos: list[GgufTensorInfo],
                data: tuple[mmap.mmap, int] | None = None) -> dict[str, Any]:
    """A Hugging Face config dict from GGUF metadata, checked against the tensors' dimensions. ``data`` (the
    mapped file and its data offset) is needed only for configs held in tensors (Phi-3's LongRoPE factors).

    Raises:
        ModelLoadError: an unsupported architecture, a field that is missing or of the wrong type, or
            metadata that disagrees with the tensors (naming the tensor and both shapes).
    """
    arch = _architecture(meta)
    family = FAMILIES[arch]
    m = Meta(meta, meta["general.architecture"])
    p = m.prefix
    heads = m.count(f"{p}.attention.head_count")
    kv_heads = m.count(f"{p}.attention.head_count_kv", heads)
    hidden = m.count(f"{p}.embedding_length")
    if heads % kv_heads:
        raise ModelLoadError(f"GGUF metadata: {heads} attention heads do not group over {kv_heads} key/value heads")
    blocks = m.count(f"{p}.block_count")
    if blocks > len(infos):  # before anything sizes a per-layer list by it: each block holds tensors of its own
        raise ModelLoadError(f"GGUF metadata says {blocks} blocks but the file describes only {len(infos)} tensors")
    cfg = {
        "model_type": family.model_type, "hidden_size": hidden, "num_hidden_layers": blocks,
        "intermediate_size": m.count(f"{p}.feed_forward_length"), "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": m.count(f"{p}.context_length", 2048),
        "rms_norm_eps": m.number(f"{p}.attention.layer_norm_rms_epsilon", 1e-6),
        "vocab_size": m.vocab(),
        "tie_word_embeddings": all(i.name != "output.weight" for i in infos),
        "bos_token_id": m.token_id("tokenizer.ggml.bos_token_id"),
        "eos_token_id": m.token_id("tokenizer.ggml.eos_token_id"),
        "pad_token_id": m.token_id("tokenizer.ggml.padding_token_id"),
    }
    if family.config is not None:
        cfg.update(family.config(m, cfg, _tensor_reader(infos, data)))
    else:
        _llama_family(m, arch, cfg, _tensor_reader(infos, data))
    _check_dims(cfg, cfg.get("head_dim") or hidden // heads, infos)
    return cfg


def _llama_family(m: Meta, arch: str, cfg: dict[str, Any], tensor: TensorReader) -> None:
    """llama, mistral and qwen2: the head size is the rotated size where the file gives one; the rotation
    scaled as rope.scaling.* says (linear, yarn) or, for llama and mistral, as rope_freqs holds (llama3)."""
    hidden, heads, p = cfg["hidden_size"], cfg["num_attention_heads"], m.prefix
    if (arch == "qwen2" or f"{p}.rope.dimension_count" not in m.meta) and hidden % heads:
        raise ModelLoadError(f"GGUF metadata: embedding length {hidden} does not split into {heads} heads")
    theta = m.number(f"{p}.rope.freq_base", 10000.0)
    rope = rope_scaling(m)
    if arch != "qwen2":
        cfg["head_dim"] = m.count(f"{p}.rope.dimension_count", hidden // heads)
        # llama.cpp's llama graph divides the base frequencies by rope_freqs (qwen2's never reads it).
        freqs = tensor("rope_freqs.weight")
        if freqs is not None and rope["rope_type"] != "default":
            raise ModelLoadError(f"GGUF has both rope_freqs.weight and {p}.rope.scaling.type {rope['rope_type']}; "
                                 "Hugging Face's rope types do not combine llama3 divisors with another scaling")
        if freqs is not None:
            rope = llama3_rope(freqs, theta, cfg["head_dim"])
    else:
        cfg["use_sliding_window"] = False
    cfg["rope_parameters"] = {**rope, "rope_theta": theta}


def _tensor_reader(infos: list[GgufTensorInfo], data: tuple[mmap.mmap, int] | None) -> TensorReader:
    by_name = {i.name: i for i in infos}

    def read(name: str) -> np.ndarray | None:
        info = by_name.get(name)
        if info is None:
            return None
        if data is None:
            raise ModelLoadError(f"GGUF tensor {name} holds configuration; pass the file's data to read it")
        return dequantize(info, *data)

    return read


def _architecture(meta: dict[str, Any]) -> str:
    arch = meta.get("general.architecture")
    if isinstance(arch, str) and arch == "llama" and "mistral" in str(meta.get("general.name", "")).lower():
        arch = "mistral"
    if not isinstance(arch, str) or arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"GGUF architecture {str(arch)[:80]!r} is not supported (GGUF: {', '.join(GGUF_ARCHITECTURES)}); "
            "convert the model to a Hugging Face folder for the other architectures"
        )
    return arch


def _block_dims(cfg: dict[str, Any], head_dim: int) -> dict[str, tuple[int, ...]]:
    """Each block tensor's GGUF dimensions (fastest-varying first) as the metadata implies them."""
    hidden, ff = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    up = 2 * ff if cfg["model_type"] == "phi3" else ff  # Phi-3's ffn_up holds gate and up
    dims: dict[str, tuple[int, ...]] = {
        "attn_q.weight": (hidden, q), "attn_k.weight": (hidden, kv), "attn_v.weight": (hidden, kv),
        "attn_qkv.weight": (hidden, q + 2 * kv), "attn_output.weight": (q, hidden),
        "ffn_gate.weight": (hidden, ff), "ffn_up.weight": (hidden, up), "ffn_down.weight": (ff, hidden),
        "attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,),
        "attn_q_norm.weight": (head_dim,), "attn_k_norm.weight": (head_dim,)}
    for norm in ("attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm"):
        dims[f"{norm}.weight"] = (hidden,)
    return dims


def _check_dims(cfg: dict[str, Any], head_dim: int, infos: list[GgufTensorInfo]) -> None:
    """Each known tensor's dimensions against the metadata, and one set of blocks per layer: a file whose
    metadata disagrees with its tensors would otherwise build a model of the metadata's size, or fail late."""
    hidden, ff, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    top = {"token_embd.weight": (hidden, vocab), "output.weight": (hidden, vocab), "output_norm.weight": (hidden,)}
    block = _block_dims(cfg, head_dim)
    layers: set[int] = set()
    for info in infos:
        m = re.fullmatch(r"blk\.(\d{1,9})\.(\w+\.(?:weight|bias))", info.name)
        want = block.get(m.group(2)) if m else top.get(info.name)
        if m:
            layers.add(int(m.group(1)))
        if want is not None and info.dims != want:
            raise ModelLoadError(f"GGUF tensor {info.name} has dimensions {info.dims} but the metadata implies "
                                 f"{want} (hidden {hidden}, vocabulary {vocab}, feed-forward {ff}, heads "
                                 f"{cfg['num_attention_heads']}/{cfg['num_key_value_heads']} of {head_dim})")
    if "token_embd.weight" not in {i.name for i in infos}:
        raise ModelLoadError("GGUF has no token_embd.weight: not a complete model")
    n = cfg["num_hidden_layers"]
    extra = sorted(i for i in layers if i >= n)
    if extra or len(layers) != n:  # the numbers below n, distinct, n of them: every block is there
        missing = next(i for i in range(len(layers) + 1) if i not in layers)
        raise ModelLoadError(f"GGUF metadata says {n} blocks but the tensors "
                             + (f"have block {extra[0]}" if extra else f"lack block {missing}"))


def _unpermute(w: np.ndarray, n_head: int, name: str) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (it interleaves rotary halves)."""
    if w.shape[0] % (2 * n_head):
        raise ModelLoadError(f"tensor {name}: {w.shape[0]} rows do not split into {n_head} heads of rotary "
                             "pairs; the GGUF's head counts do not match its weights")
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _hf_name(family: Family, name: str) -> tuple[str | None, str]:
    """(Hugging Face name or None for a tensor with no weight, the block part or '')."""
    m = _BLOCK.fullmatch(name)
    if not m:
        return TOP_NAMES.get(name), ""
    part = family.block.get(m.group(2))
    return (f"model.layers.{int(m.group(1))}.{part}.{m.group(3)}" if part else None), m.group(2)


def _fixed(family: Family, cfg: dict[str, Any], hf: str, part: str, w: np.ndarray, name: str) -> np.ndarray:
    """A tensor as Hugging Face holds it: llama's q/k rows back in order, Gemma's norms without the added 1."""
    if family.permute and part == "attn_q":
        return _unpermute(w, cfg["num_attention_heads"], name)
    if family.permute and part == "attn_k":
        return _unpermute(w, cfg["num_key_value_heads"], name)
    if family.norm_shift and hf.endswith("norm.weight"):
        return w - np.float32(family.norm_shift)
    return w


def gguf_weights(path: Path, meta: dict[str, Any], infos: list[GgufTensorInfo], mm: mmap.mmap,
                 start: int, cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """Dequantize every tensor to float32 under its Hugging Face name.

    Raises:
        ModelLoadError: a tensor that runs past the end of the file, or of a type or shape that is no weight's.
    """
    family = FAMILIES[_architecture(meta)]
    out: dict[str, np.ndarray] = {}
    for info in infos:
        name, part = _hf_name(family, info.name)
        if name is None and family.not_weights is not None and info.name not in family.not_weights:
            raise ModelLoadError(f"{path}: GGUF tensor {info.name} has no place in a {family.model_type} model as "
                                 "this reader maps it; loading without it would change the model")
        if name is None:
            continue  # Phi-3's rope factors (read into the config), or what llama's family passes over
        try:
            w = _fixed(family, cfg, name, part, dequantize(info, mm, start), info.name)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{path}: {exc}") from None
        if name in out:
            raise ModelLoadError(f"{path}: tensors {info.name} and another both map to {name}")
        out[name] = np.ascontiguousarray(w)
    return out
