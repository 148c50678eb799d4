"""The ExecuTorch side of the runner: a ``.pte`` decoder through ExecuTorch's runtime (Python bindings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .onnx_run import greedy_loop


class PteDecoder:
    """Runs a ``.pte`` decoder through ExecuTorch's runtime with the ``OnnxDecoder`` interface: full
    logits for scoring, greedy generation with the program's own KV cache."""

    static_len = None

    def __init__(self, path: Path, threads: int = 0) -> None:
        # The program calls llama::update_cache / custom_sdpa: importing ExecuTorch's custom ops registers
        # their kernels with the runtime.
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
        import torch
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        if threads:
            portable_lib._unsafe_reset_threadpool(threads)
        self.torch = torch
        self.method = Runtime.get().load_program(Path(path)).load_method("forward")

    def _run(self, tokens: list[int], pos: int) -> np.ndarray:
        t = self.torch
        return self.method.execute([t.tensor([tokens], dtype=t.long), t.tensor([pos], dtype=t.long)])[0].numpy()

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Logits of every position, one row at a time from position 0 (the cache is overwritten)."""
        rows = []
        for i, row in enumerate(input_ids):
            keep = row if attention_mask is None else row[attention_mask[i] > 0]
            rows.append(self._run([int(x) for x in keep], 0)[0])
        return np.stack(rows)

    def generate(self, prompt: list[int], max_new_tokens: int, eos_token_id: int | None = None,
                 on_token: Any = None) -> tuple[list[int], Any]:
        return greedy_loop(lambda: self._run(list(prompt), 0)[0, -1], lambda token, pos: self._run([token], pos)[0, -1],
                           len(prompt), max_new_tokens, eos_token_id, on_token)

