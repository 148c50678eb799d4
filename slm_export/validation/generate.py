"""Generation on the host: the runner's decoders, re-exported, and the PyTorch reference's greedy loop."""

from __future__ import annotations

from typing import Any

from slm_export.runner.onnx_run import GenerationTiming, OnnxDecoder, make_session

__all__ = ["GenerationTiming", "OnnxDecoder", "forced_greedy", "make_session", "torch_greedy"]


def forced_greedy(module: Any, prompt: list[int], path: list[int]) -> list[int]:
    """The reference's greedy tokens along another system's greedy ``path``, in one forward pass over prompt + path:
    up to the first token where the two differ they are the reference's own greedy continuation (each position
    sees the same prefix), and that first differing token is the reference's own choice there; nothing after it is
    returned. For a streamed module, where each forward reads every weight again, this costs one pass, not one
    a token."""
    import torch

    if not path:
        return []
    with torch.no_grad():
        logits = module(torch.tensor([prompt + path[:-1]])).logits[0, len(prompt) - 1:]
    out: list[int] = []
    for want, row in zip(path, logits, strict=True):
        out.append(int(row.argmax()))
        if out[-1] != want:
            break
    return out


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
