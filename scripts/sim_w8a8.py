#!/usr/bin/env python
"""PyTorch simulation of a W8A8 compression of smollm2-135m: dequantized int8 weights, int8 activations
(fake-quantized with the calibrated static scale, or per token), online rotations as hooks; prints the
perplexity change on the evaluation half (8 x 512) and the worst per-layer SQNRs. Faster to iterate on
than a full export; the artifact figure comes from the CLI or scripts/bench_compress.py.

Usage: python scripts/sim_w8a8.py [rot=128] [pow2=1] [n=16] [alpha=0.8] [obs=minmax] [method=dynamic] [acts=0]
"""
import dataclasses
import math
import sys
import time

import torch

from slm_export.calibration.compress import CompressConfig, compress, linear_names
from slm_export.calibration.observers import fake_quant, fake_quant_per_token
from slm_export.calibration.quant import QuantizedTensor
from slm_export.calibration.rotation import Rotation
from slm_export.models.loader import build_module, load_model
from slm_export.text import builtin_split, token_windows

torch.set_num_threads(2)
args = dict(a.split("=") for a in sys.argv[1:])
m = load_model("smollm2-135m")
wins = token_windows(m.tokenizer, builtin_split("evaluation"), int(args.get("win", 8)), 512)


def ppl(mod):  # type: ignore[no-untyped-def]
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in wins:
            ids = torch.tensor([w])
            lg = mod(input_ids=ids).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(lg, ids[0, 1:], reduction="sum"))
            n += len(w) - 1
    return math.exp(nll / n)


ref = ppl(m.torch_module())
cfg = CompressConfig(precision="int8", method=args.get("method", "smoothquant"),
                     calib_samples=int(args.get("n", 16)),
                     calib_seqlen=512, rotate=int(args.get("rot", 0)), pow2_scales=args.get("pow2", "0") == "1",
                     smooth_alpha=float(args["alpha"]) if "alpha" in args else None, observer=args.get("obs", "minmax"))
t = time.time()
res = compress(m, cfg)
ct = time.time() - t
deq = {k: (torch.from_numpy(v.dequantize()) if isinstance(v, QuantizedTensor) else v) for k, v in res.weights.items()
       if not k.endswith((".signs", ".block"))}
mod = build_module(dataclasses.replace(m, weights=deq))  # a new module over the dequantized weights
acts = args.get("acts", "1") == "1"
for name, lin in linear_names(mod).items():
    q = res.weights[name + ".weight"]
    if name + ".rotation.signs" in res.weights and name + ".rotation.signs" in res.weights:
        r = Rotation(res.weights[name + ".rotation.signs"], res.weights[name + ".rotation.block"])
        lin.register_forward_pre_hook(lambda mm, a, r=r: (r.apply(a[0]),))
    if acts and q.act_scale is not None:
        lin.register_forward_pre_hook(lambda mm, a, s=q.act_scale: (fake_quant(a[0], s),))
    elif acts and q.act_dynamic:
        lin.register_forward_pre_hook(lambda mm, a: (fake_quant_per_token(a[0]),))
p = ppl(mod)
print(args, f"ref {ref:.4f} q {p:.4f} change {100*(p/ref-1):+.2f}% compress {ct:.0f}s", flush=True)
sq = [(e["layer"].split("layers.")[1], e.get("act_sqnr_db"), e["weight_sqnr_db"], e.get("smooth_alpha"))
      for e in res.layers]
print("worst act sqnr:", sorted([x for x in sq if x[1] is not None], key=lambda x: x[1])[:6])
print("worst w sqnr:", sorted(sq, key=lambda x: x[2])[:4])
