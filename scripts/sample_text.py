#!/usr/bin/env python
"""Text sampled from a model itself (data-free calibration text): batches of sequences from its first token,
temperature 1 and top-p 0.95, seeded. scripts/bench_calib_text.py compares calibration on it with the
built-in half.

    python scripts/sample_text.py --model smollm2-135m --batches 5 --batch 16 --tokens 512 --out sampled.txt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import torch

    from slm_export.models import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    module, tok = model.torch_module(), model.tokenizer
    first = tok.bos_token_id if tok.bos_token_id is not None else 0
    torch.manual_seed(0)
    texts, t0 = [], time.perf_counter()
    for b in range(args.batches):
        start = torch.full((args.batch, 1), first)
        with torch.no_grad():
            out = module.generate(start, do_sample=True, temperature=1.0, top_p=0.95, max_new_tokens=args.tokens,
                                  min_new_tokens=args.tokens, pad_token_id=tok.eos_token_id)
        texts += [tok.decode(row[1:], skip_special_tokens=True) for row in out]
        print(f"batch {b + 1}/{args.batches}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    args.out.write_text("\n\n".join(texts), encoding="utf-8")


if __name__ == "__main__":
    main()
