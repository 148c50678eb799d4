"""ONNX Runtime GenAI: the files its generator reads, written beside the ORT runtime file of a fused decoder,
so that ``onnxruntime_genai.Model(folder)`` loads the artifact folder as it is.

- ``genai_config.json`` (the schema of onnxruntime-genai's ``src/config.cpp`` and of the file its model
  builder writes, ``make_genai_config``): the model type, the decoder file, its input and output names,
  the head layout, the context length, the special tokens and the search defaults. Every value is read
  from the exported graph, the model's configuration and its generation config; none is assumed.
- ``tokenizer.json``, ``tokenizer_config.json`` (and ``special_tokens_map.json``, ``chat_template.jinja``
  where the model has them): GenAI's tokenizer looks for them beside ``genai_config.json``
  (``model.tokenizer_dir`` exists only from GenAI 0.15 on, and older versions refuse the unknown key).

Only the fused ONNX Runtime graphs qualify: their attention appends to a cache shared between past and
present (GenAI's ``past_present_share_buffer``), and their ``logits_to_keep`` is an optional input whose
default (0) returns every position's logits, which GenAI allocates and reads (it never feeds the input).
Anything else gets no config, and the reason is returned.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper

from slm_export.runner.onnx_run import KV_CACHE_KEY, KV_SHARED_BUFFER, LOGITS_TO_KEEP

GENAI_CONFIG = "genai_config.json"
# What GenAI's tokenizer reads from the folder; tokenizer.json is required.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# model.type values that GenAI runs as its plain decoder-only model (ModelType::IsLLM). Its "gpt2" type
# expects GPT-2's combined past_%d cache instead; such models (and any other) are written as "decoder".
GENAI_TYPES = ("gemma", "llama", "mistral", "phi3", "qwen2")
NAMES = {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value",
         "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
PLAIN_INPUTS = ("input_ids", "attention_mask", "position_ids")
# Search options taken from the model's generation config when it sets them (GenAI's own defaults otherwise).
SEARCH_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")


@dataclass(frozen=True)
class DecoderGraph:
    """What genai_config.json needs from the exported graph."""

    layers: int
    heads: int
    kv_heads: int
    head_size: int
    hidden: int
    vocab: int
    positions: int  # rows of the rotary (or learned position) table: the longest sequence the graph computes
    inputs: tuple[str, ...]  # the plain inputs the graph takes (input_ids, attention_mask, position_ids)


def read_graph(model_path: Path) -> DecoderGraph | str:
    """The decoder facts of an exported graph (no weights are loaded), or why GenAI cannot run it."""
    model = onnx.load(str(model_path), load_external_data=False)
    g = model.graph
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get(KV_CACHE_KEY) != KV_SHARED_BUFFER:
        return "the graph's attention does not append in place (not the fused ONNX Runtime graph)"
    inits = {t.name: list(t.dims) for t in g.initializer}
    keep = [numpy_helper.to_array(t) for t in g.initializer if t.name == LOGITS_TO_KEEP]
    required = [i.name for i in g.input if i.name not in inits]
    past = [n for n in required if n.startswith("past_key_values.")]
    others = [n for n in required if n not in past and n not in PLAIN_INPUTS]
    if others:
        return f"the graph takes inputs GenAI does not feed: {', '.join(others)}"
    if not keep or int(keep[0]) != 0:
        return "the graph's logits_to_keep is not an optional input returning every position by default"
    logits = next(o for o in g.output if o.name == "logits").type.tensor_type.shape.dim
    first = next(i for i in g.input if i.name == "past_key_values.0.key").type.tensor_type.shape.dim
    gqa = next(n for n in g.node if n.op_type == "GroupQueryAttention")
    heads = next(a.i for a in gqa.attribute if a.name == "num_heads")
    table = inits.get("rope.cos_half") or inits.get("model.pos_embed")
    return DecoderGraph(layers=len(past) // 2, heads=heads, kv_heads=first[1].dim_value, head_size=first[3].dim_value,
                        hidden=inits["model.embed"][1], vocab=logits[2].dim_value,
                        positions=table[0] if table else 0,
                        inputs=tuple(n for n in PLAIN_INPUTS if n in required))


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def special_tokens(generation: dict[str, Any], config: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """bos, eos and pad ids: the generation config's, else the model config's, else the tokenizer's. A
    model without a pad token gets its (first) eos, as GenAI's own model builder does: GenAI masks prompt
    tokens equal to ``pad_token_id``, and its default (0) is usually a real token."""
    ids: dict[str, Any] = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        for source in (generation, config):
            if source.get(key) is not None:
                ids[key] = source[key]
                break
        else:
            value = getattr(tokenizer, key, None) if tokenizer is not None else None
            if value is not None:
                ids[key] = int(value)
    if "pad_token_id" not in ids and "eos_token_id" in ids:
        ids["pad_token_id"] = ids["eos_token_id"]
    for key in ("bos_token_id", "pad_token_id"):  # one id each; eos may be a list (GenAI stops at any)
        if isinstance(ids.get(key), list):
            ids[key] = ids[key][0]
    return ids


def context_length(max_seq_len: int, graph: DecoderGraph, config: dict[str, Any]) -> int:
    """The longest sequence GenAI may run: the plan's ``max_seq_len`` (the length of the graph's rotary or
    position table), and never longer than that table nor the model's own limit."""
    limits = (max_seq_len, graph.positions, config.get("max_position_embeddings"), config.get("n_positions"))
    return min(int(n) for n in limits if isinstance(n, int) and n > 0)


def _session_options(runtime_file: Path) -> dict[str, Any]:
    """The ONNX Runtime session options the file needs: the offline-optimized ONNX is loaded with graph
    optimizations off (they are done), the ORT format as it is. Intra-op threads stay unset (all cores)."""
    options: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": []}
    if runtime_file.suffix == ".onnx":
        options["graph_optimization_level"] = "ORT_DISABLE_ALL"
    return options


def genai_config(graph: DecoderGraph, runtime_file: str, model_type: str, context: int, ids: dict[str, Any],
                 generation: dict[str, Any], session_options: dict[str, Any]) -> dict[str, Any]:
    """The genai_config.json document for a fused decoder graph."""
    inputs = {n: n for n in graph.inputs}
    inputs.update({k: v for k, v in NAMES.items() if k.startswith("past")})
    outputs = {"logits": "logits", **{k: v for k, v in NAMES.items() if k.startswith("present")}}
    decoder = {"session_options": session_options, "filename": runtime_file, "head_size": graph.head_size,
               "hidden_size": graph.hidden, "inputs": inputs, "outputs": outputs,
               "num_attention_heads": graph.heads, "num_hidden_layers": graph.layers,
               "num_key_value_heads": graph.kv_heads}
    search = {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1, "num_return_sequences": 1,
              "past_present_share_buffer": True}
    search.update({k: generation[k] for k in SEARCH_KEYS if generation.get(k) is not None})
    model = {"type": model_type if model_type in GENAI_TYPES else "decoder", "context_length": context,
             "decoder": decoder, "vocab_size": graph.vocab, **ids}
    return {"model": model, "search": search}


def write_genai_files(job: Any, runtime_file: Path) -> tuple[list[str], str]:
    """Write genai_config.json and the tokenizer files beside ``runtime_file`` (in the artifact folder
    being written). Returns the files written and a note: what was written, or why nothing was."""
    folder = runtime_file.parent
    if job.model_kind != "decoder":
        return [], "no genai_config.json: GenAI's generator runs decoders only"
    graph = read_graph(job.model_path)
    if isinstance(graph, str):
        return [], f"no genai_config.json: {graph}"
    tokenizer_dir = folder / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        return [], "no genai_config.json: the model's tokenizer has no tokenizer.json, the file GenAI reads"
    config = _json(folder / "config.json")
    model = getattr(job, "model", None)
    source = Path(model.path) if model is not None else None
    generation = _json(source / "generation_config.json") if source is not None and source.is_dir() else {}
    ids = special_tokens(generation, config, getattr(model, "tokenizer", None))
    document = genai_config(graph, runtime_file.name, str(config.get("model_type", "")),
                            context_length(job.plan.max_seq_len, graph, config), ids, generation,
                            _session_options(runtime_file))
    (folder / GENAI_CONFIG).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    written = [GENAI_CONFIG]
    for name in TOKENIZER_FILES:  # a copy another backend put there already (ExecuTorch's) is the same file
        if (tokenizer_dir / name).is_file() and not (folder / name).exists():
            shutil.copyfile(tokenizer_dir / name, folder / name)
            written.append(name)
    return written, f"{GENAI_CONFIG} and the tokenizer beside it: ONNX Runtime GenAI loads the folder"
