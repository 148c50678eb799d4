"""A lean GGUF reader: one pass over the header, tensors dequantized one at a time to float32.

transformers' own GGUF path parses the file three times and maps names per module (about 17 s and
2.2x the weights in memory for SmolLM2-135M); this reads the header once and keeps one float32 copy.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slm_export.errors import ModelLoadError

# GGUF metadata value types -> struct format (strings and arrays handled apart).
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

# GGUF tensor names -> Hugging Face names for the Llama family (llama, mistral, qwen2).
_LLAMA_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class GgufTensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: fastest-varying first
    ggml_type: int
    offset: int


class _Cursor:
    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("Q")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, keep_arrays: bool) -> Any:
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("I"), self.take("Q")
            if etype in _SCALAR and not keep_arrays:
                self.pos += struct.calcsize(_SCALAR[etype]) * count
                return count
            items = [self.value(etype, keep_arrays) for _ in range(count)]
            return items if keep_arrays else count
        raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf(path: Path) -> tuple[dict[str, Any], list[GgufTensorInfo], mmap.mmap, int]:
    """Parse header, metadata (arrays as counts) and tensor infos; return the mapped file too."""
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(mm)
    if cur.take("I") != 0x46554747:  # b"GGUF"
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic)")
    version = cur.take("I")
    if version < 2:
        raise ModelLoadError(f"{path}: GGUF version {version} is too old (need 2 or later)")
    n_tensors, n_kv = cur.take("Q"), cur.take("Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.take("I"), keep_arrays=False)
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = tuple(cur.take("Q") for _ in range(cur.take("I")))
        infos.append(GgufTensorInfo(name, dims, cur.take("I"), cur.take("Q")))
    align = int(meta.get("general.alignment", 32))
    data_start = (cur.pos + align - 1) // align * align
    return meta, infos, mm, data_start


def _dequantize(info: GgufTensorInfo, mm: mmap.mmap, start: int) -> np.ndarray:
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(info.ggml_type)]
    n = int(np.prod(info.dims))
    nbytes = n // block * type_size
    begin = start + info.offset
    if begin + nbytes > len(mm):
        raise ModelLoadError(f"tensor {info.name} runs past the end of the file: the GGUF is truncated")
    raw = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=begin)
    shape = tuple(reversed(info.dims))
    if info.ggml_type == 0:
        return raw.view(np.float32).reshape(shape).copy()
    if info.ggml_type == 1:
        return raw.view(np.float16).reshape(shape).astype(np.float32)
    rows = raw.reshape(n // info.dims[0], -1)
    return np.asarray(gguf.quants.dequantize(rows, info.ggml_type), dtype=np.float32).reshape(shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (it interleaves rotary halves)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def gguf_config(meta: dict[str, Any], infos: list[GgufTensorInfo]) -> dict[str, Any]:
    """A Hugging Face config dict from GGUF metadata (Llama family)."""
    arch = meta.get("general.architecture")
    if arch == "llama" and "mistral" in str(meta.get("general.name", "")).lower():
        arch = "mistral"
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"GGUF architecture {arch!r} is not supported (GGUF: {', '.join(GGUF_ARCHITECTURES)}); "
            "convert the model to a Hugging Face folder for the other architectures"
        )
    p = meta.get("general.architecture")
    heads = meta[f"{p}.attention.head_count"]
    hidden = meta[f"{p}.embedding_length"]
    cfg = {
        "model_type": arch, "hidden_size": hidden, "num_hidden_layers": meta[f"{p}.block_count"],
        "intermediate_size": meta[f"{p}.feed_forward_length"], "num_attention_heads": heads,
        "num_key_value_heads": meta.get(f"{p}.attention.head_count_kv", heads),
        "max_position_embeddings": meta.get(f"{p}.context_length", 2048),
        "rms_norm_eps": meta.get(f"{p}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": meta.get(f"{p}.rope.freq_base", 10000.0),
        "vocab_size": meta.get(f"{p}.vocab_size") or meta.get("tokenizer.ggml.tokens"),
        "tie_word_embeddings": all(i.name != "output.weight" for i in infos),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    if arch != "qwen2":
        cfg["head_dim"] = meta.get(f"{p}.rope.dimension_count", hidden // heads)
    if arch == "qwen2":
        cfg["use_sliding_window"] = False
    return cfg


def gguf_weights(path: Path, meta: dict[str, Any], infos: list[GgufTensorInfo], mm: mmap.mmap,
                 start: int, cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """Dequantize every tensor to float32 under its Hugging Face name."""
    permute = cfg["model_type"] in ("llama", "mistral")
    out: dict[str, np.ndarray] = {}
    for info in infos:
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", info.name)
        if m:
            part = _LLAMA_BLOCK.get(m.group(2))
            name = f"model.layers.{m.group(1)}.{part}.{m.group(3)}" if part else None
        else:
            name = _LLAMA_NAMES.get(info.name)
        if name is None:
            continue  # e.g. rope_freqs: derived from the config instead
        w = _dequantize(info, mm, start)
        if permute and m and m.group(2) == "attn_q":
            w = _unpermute(w, cfg["num_attention_heads"])
        elif permute and m and m.group(2) == "attn_k":
            w = _unpermute(w, cfg["num_key_value_heads"])
        out[name] = np.ascontiguousarray(w)
    return out
