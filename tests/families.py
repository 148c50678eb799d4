"""The tiny random decoder of every supported family, each feature made to bite within the tests' text.

The tests run 12-token sequences and 12 greedy steps: sliding windows are 4 tokens, soft-caps low enough to
clip random-weight scores and logits, multipliers far from 1, and ``initializer_range`` 0.2 so logits are
not flat. ``NEUTRAL`` gives, per family, the overrides that switch its distinctive features off: a test
checks that transformers' logits then change, so every feature in the table is one that matters.
docs/models.md is generated from this table (scripts/gen_models_doc.py), so the support matrix cannot drift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

VOCAB = 384
COMMON: dict[str, Any] = {"vocab_size": VOCAB, "eos_token_id": 0, "pad_token_id": 1, "bos_token_id": 0,
                          "initializer_range": 0.2, "max_position_embeddings": 512}
LLAMA_LIKE: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2, **COMMON}
WINDOW = 4
SLIDE_FULL = ["sliding_attention", "full_attention"]

# family -> (transformers config class, its arguments)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {**LLAMA_LIKE, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {**LLAMA_LIKE, "tie_word_embeddings": False, "sliding_window": WINDOW}),
    "qwen2": ("Qwen2Config", {**LLAMA_LIKE, "tie_word_embeddings": False, "use_sliding_window": True,
                              "sliding_window": WINDOW, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {**LLAMA_LIKE, "head_dim": 32, "tie_word_embeddings": False}),
    "phi3": ("Phi3Config", {**LLAMA_LIKE, "tie_word_embeddings": False}),
    "gemma": ("GemmaConfig", {**LLAMA_LIKE, "num_key_value_heads": 1, "head_dim": 32}),
    "gemma2": ("Gemma2Config", {**LLAMA_LIKE, "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": WINDOW,
                                "layer_types": SLIDE_FULL, "attn_logit_softcapping": 2.0,
                                "final_logit_softcapping": 3.0}),
    "gemma3_text": ("Gemma3TextConfig", {
        **LLAMA_LIKE, "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": WINDOW,
        "layer_types": SLIDE_FULL, "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
    "smollm3": ("SmolLM3Config", {**LLAMA_LIKE, "num_hidden_layers": 3, "no_rope_layer_interval": 2,
                                  "tie_word_embeddings": True}),
    "olmo2": ("Olmo2Config", {**LLAMA_LIKE, "tie_word_embeddings": False}),
    "granite": ("GraniteConfig", {**LLAMA_LIKE, "embedding_multiplier": 3.0, "residual_multiplier": 0.4,
                                  "attention_multiplier": 0.1, "logits_scaling": 4.0, "tie_word_embeddings": True}),
    "phi": ("PhiConfig", {**LLAMA_LIKE, "num_key_value_heads": 4, "rope_parameters": {
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}, "qk_layernorm": False}),
    "gpt_neox": ("GPTNeoXConfig", {**LLAMA_LIKE, "num_key_value_heads": 4, "use_parallel_residual": True,
                                   "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                       "partial_rotary_factor": 0.25}}),
    "opt": ("OPTConfig", {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "word_embed_proj_dim": 64, "init_std": 0.2, **COMMON}),
    "stablelm": ("StableLmConfig", {**LLAMA_LIKE, "use_qkv_bias": True, "qk_layernorm": True,
                                    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                        "partial_rotary_factor": 0.25}}),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512,
                            **{k: v for k, v in COMMON.items() if k != "max_position_embeddings"}}),
}

# Variants of a family: the same model class with a different structure the exporter must follow too.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "opt-350m-style": ("OPTConfig", {**FAMILIES["opt"][1], "word_embed_proj_dim": 32, "do_layer_norm_before": False}),
    "stablelm-parallel": ("StableLmConfig", {**FAMILIES["stablelm"][1], "use_parallel_residual": True,
                                             "qk_layernorm": False, "use_qkv_bias": False}),
    "gpt_neox-sequential": ("GPTNeoXConfig", {**FAMILIES["gpt_neox"][1], "use_parallel_residual": False}),
}

# Overrides that switch a family's distinctive features off (the feature must change transformers' logits).
NEUTRAL: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": None},
    "qwen2": {"use_sliding_window": False},
    "gemma2": {"sliding_window": 4096, "attn_logit_softcapping": None, "final_logit_softcapping": None},
    "gemma3_text": {"sliding_window": 4096},
    "smollm3": {"no_rope_layer_interval": 1000},
    "granite": {"embedding_multiplier": 1.0, "residual_multiplier": 1.0, "attention_multiplier": 0.25,
                "logits_scaling": 1.0},
    "gpt_neox": {"use_parallel_residual": False},
    "stablelm": {"qk_layernorm": False},
}


def family_config(name: str) -> Any:
    import transformers

    cls, kwargs = {**FAMILIES, **VARIANTS}[name]
    return getattr(transformers, cls)(**kwargs)


def neutral_config(name: str) -> Any:
    import transformers

    cls, kwargs = FAMILIES[name]
    return getattr(transformers, cls)(**{**kwargs, **NEUTRAL[name]})


def make_family_model(name: str, folder: Path, config: Any = None) -> Path:
    """A seeded random model of family (or variant) ``name`` with the tests' tokenizer, saved in ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.conftest import _tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    _tokenizer(folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config if config is not None else family_config(name))
    model.save_pretrained(folder)
    return folder
