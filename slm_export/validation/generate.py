"""Generation on the host: the runner's decoders, re-exported, and the PyTorch reference's greedy loop."""

from __future__ import annotations

from typing import Any

from slm_export.runner.onnx_run import GenerationTiming, OnnxDecoder, make_session

__all__ = ["GenerationTiming", "OnnxDecoder", "make_session", "torch_greedy"]


def torch_greedy(module: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation from the PyTorch reference with its own KV cache; EOS is not special-cased,
    matching ``OnnxDecoder.generate`` without an ``eos_token_id``."""
    import torch

    out: list[int] = []
    with torch.no_grad():
        ids = torch.tensor([prompt])
        past = None
        for _ in range(max_new_tokens):
            res = module(input_ids=ids, cache=past, use_cache=True)
            past = res.cache
            token = int(res.logits[0, -1].argmax())
            out.append(token)
            ids = torch.tensor([[token]])
    return out
