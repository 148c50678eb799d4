#!/usr/bin/env python3
"""ExecuTorch + XNNPACK demo: tiny Llama-style decoder with a static KV cache.

Export -> (optional) quantize -> lower to XNNPACK -> .pte -> run with the
ExecuTorch Python runtime (prefill + decode steps) -> compare with eager.

Tested with: torch==2.13.0+cpu, executorch==1.5.1, torchao==0.18.0, Python 3.11, x86_64.

Usage:
  python et_demo.py --quant 8da4w      # int8 dyn-act + int4 per-group(32) weights (torchao quantize_)
  python et_demo.py --quant 8da8w      # int8 dyn-act + int8 per-channel weights  (torchao quantize_)
  python et_demo.py --quant pt2e       # XNNPACKQuantizer PT2E flow, dynamic int8 per-channel linear
  python et_demo.py --quant none       # fp32
  add --attn custom to use ExecuTorch's LLM custom ops (llama::update_cache + llama::custom_sdpa)
  instead of index_copy_ + F.scaled_dot_product_attention (default --attn plain).
Options: --out DIR (default /tmp/et/out), --threads N (torch threads, default 1)
Prints: delegation summary + per-op table (get_delegation_info), per-step max |logit diff|
vs eager (same quantization, and fp32), a fresh-Method reset check, rough decode latency.
"""
import argparse
import copy
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------
# Model (plain torch, no transformers)
# ----------------------------------------------------------------------------
class Cfg:
    vocab = 256
    dim = 64
    n_layers = 2
    n_heads = 4
    n_kv_heads = 2          # GQA: 2 query heads per kv head
    head_dim = 16
    ffn_hidden = 128        # multiple of the int4 group size (32)
    max_seq = 64
    attn = "plain"          # "plain": index_copy_ + F.sdpa ; "custom": llama::update_cache + llama::custom_sdpa
    rope_theta = 10000.0
    eps = 1e-5


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(cfg):
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    t = torch.arange(cfg.max_seq).float()
    f = torch.outer(t, inv)                       # [max_seq, hd/2]
    return f.cos(), f.sin()


def apply_rope(x, cos, sin):
    # x: [B, H, S, hd]; cos/sin: [S, hd/2]  (rotate-half convention)
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    cos = torch.cat([cos, cos], -1)
    sin = torch.cat([sin, sin], -1)
    rot = torch.cat([-x2, x1], -1)
    return x * cos + rot * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        if cfg.attn == "plain":
            shape = (1, cfg.n_kv_heads, cfg.max_seq, hd)     # [B, Hkv, T, D]
        else:
            shape = (1, cfg.max_seq, cfg.n_kv_heads, hd)     # [B, T, Hkv, D] layout of llama:: custom ops
        # static KV cache: registered (persistent) buffers mutated in place
        self.register_buffer("k_cache", torch.zeros(shape))
        self.register_buffer("v_cache", torch.zeros(shape))

    def forward(self, x, start_pos, cos, sin, mask):
        B, S, _ = x.shape
        c = self.cfg
        q = self.wq(x).view(B, S, c.n_heads, c.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, S, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, S, c.n_kv_heads, c.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if c.attn == "custom":
            # ExecuTorch's own LLM path: optimized CPU kernels (not XNNPACK), GQA handled inside,
            # causal masking from start_pos (no mask tensor, no repeat_interleave).
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [B, S, H, D]
            torch.ops.llama.update_cache(k, self.k_cache, start_pos)
            torch.ops.llama.update_cache(v, self.v_cache, start_pos)
            y = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start_pos, None, 0, True)
            return self.wo(y.reshape(B, S, c.n_heads * c.head_dim))
        # in-place cache update at positions [start_pos, start_pos+S)
        idx = torch.arange(S) + start_pos
        self.k_cache.index_copy_(2, idx, k)
        self.v_cache.index_copy_(2, idx, v)
        rep = c.n_heads // c.n_kv_heads
        kk = self.k_cache.repeat_interleave(rep, dim=1)   # GQA
        vv = self.v_cache.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(B, S, c.n_heads * c.head_dim))


class MLP(nn.Module):  # SwiGLU
    def __init__(self, cfg):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x, start_pos, cos, sin, mask):
        x = x + self.attn(self.attn_norm(x), start_pos, cos, sin, mask)
        return x + self.mlp(self.ffn_norm(x))


class TinyLlama(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.eps)
        self.out = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        m = torch.full((cfg.max_seq, cfg.max_seq), float("-inf")).triu(1)  # 0 on/below diag
        self.register_buffer("mask", m, persistent=False)

    def forward(self, tokens, input_pos):
        # tokens: [1, S] int64 ; input_pos: [1] int64 = start position of this chunk
        S = tokens.shape[1]
        start_pos = input_pos[0].item()
        torch._check_is_size(start_pos)
        torch._check(start_pos + S <= self.cfg.max_seq)
        cos = self.rope_cos.narrow(0, start_pos, S)
        sin = self.rope_sin.narrow(0, start_pos, S)
        mask = self.mask.narrow(0, start_pos, S)      # [S, max_seq]
        x = self.tok(tokens)
        for layer in self.layers:
            x = layer(x, start_pos, cos, sin, mask)
        return self.out(self.norm(x))


# ----------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------
def quantize_torchao(model, mode, group_size=32):
    from torchao.quantization import quantize_, Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    cfg = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4 if mode == "8da4w" else torch.int8,
        weight_granularity=PerGroup(group_size) if mode == "8da4w" else PerAxis(0),
    )
    # only nn.Linear (default filter); keep embedding fp32
    quantize_(model, cfg)
    return model


def quantize_pt2e(model, example_inputs, dynamic_shapes):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, convert_pt2e

    q = XNNPACKQuantizer()
    q.set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))
    gm = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes).module()
    gm = prepare_pt2e(gm, q)
    gm(*example_inputs)                      # calibration (dynamic quant needs none, but harmless)
    gm = convert_pt2e(gm)
    return gm


# ----------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", default="8da4w", choices=["none", "8da4w", "8da8w", "pt2e"])
    ap.add_argument("--out", default="/tmp/et/out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--attn", default="plain", choices=["plain", "custom"],
                    help="plain: index_copy_ + F.scaled_dot_product_attention; "
                         "custom: torch.ops.llama.update_cache/custom_sdpa")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)

    from torch.export import Dim, export
    from executorch.exir import (EdgeCompileConfig, ExecutorchBackendConfig,
                                 to_edge_transform_and_lower)
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.runtime import Runtime

    cfg = Cfg()
    cfg.attn = args.attn
    if args.attn == "custom":
        # registers torch.ops.llama.* (AOT meta/CPU impls) and their ExecuTorch runtime kernels
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    fp_model = TinyLlama(cfg).eval()
    # make weights a bit larger than default init so logits are not ~0
    with torch.no_grad():
        for p in fp_model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)

    prompt = torch.randint(0, cfg.vocab, (1, 7))
    decode_tokens = [torch.randint(0, cfg.vocab, (1, 1)) for _ in range(5)]
    ex_inputs = (prompt, torch.tensor([0]))
    seq = Dim("seq", min=1, max=cfg.max_seq - 1)
    dyn = {"tokens": {1: seq}, "input_pos": None}

    t0 = time.time()
    with torch.no_grad():
        if args.quant in ("8da4w", "8da8w"):
            model = quantize_torchao(copy.deepcopy(fp_model), args.quant)
        elif args.quant == "pt2e":
            model = quantize_pt2e(copy.deepcopy(fp_model), ex_inputs, dyn)
        else:
            model = copy.deepcopy(fp_model)

        # eager references (on deep copies so the export copy's caches stay zero)
        def run_eager(m):
            m = copy.deepcopy(m)
            outs = [m(prompt, torch.tensor([0]))]
            pos = prompt.shape[1]
            for t in decode_tokens:
                outs.append(m(t, torch.tensor([pos])))
                pos += 1
            return outs

        ref_fp = run_eager(fp_model)
        ref_q = run_eager(model)
        if args.quant == "pt2e":   # pt2e gm buffers were mutated by calibration: reset caches
            for n, b in model.named_buffers():
                if "cache" in n:
                    b.zero_()

        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
            ep = export(model, ex_inputs, dynamic_shapes=dyn, strict=False)
    t_export = time.time() - t0

    t0 = time.time()
    edge = to_edge_transform_and_lower(
        ep,
        partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
    )
    info = get_delegation_info(edge.exported_program().graph_module)
    et_prog = edge.to_executorch(ExecutorchBackendConfig(
        # serialize the (zero) initial KV-cache contents; otherwise mutable buffers are
        # left uninitialized in the .pte ("meaningless initial state") and garbage/NaN in
        # not-yet-written cache slots could leak through 0*NaN in attention.
        passes=[InitializedMutableBufferPass(["k_cache", "v_cache"])],
        extract_delegate_segments=True,
        do_quant_fusion_and_const_prop=True,
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
        sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
    ))
    pte = os.path.join(args.out, f"tiny_llama_{args.quant}_{args.attn}.pte")
    with open(pte, "wb") as f:
        et_prog.write_to_file(f)
    t_lower = time.time() - t0

    print(f"== quant={args.quant} attn={args.attn}  export {t_export:.1f}s  lower+emit {t_lower:.1f}s  "
          f"pte {os.path.getsize(pte)/1024:.1f} KiB -> {pte}")
    print(info.get_summary())
    try:
        import tabulate  # noqa: F401
        df = info.get_operator_delegation_dataframe()
        print(df.to_string(index=False))
    except Exception as e:  # pandas/tabulate missing
        print("(no dataframe)", e)

    # ---------------- ExecuTorch runtime ----------------
    rt = Runtime.get()
    program = rt.load_program(pte)
    method = program.load_method("forward")   # keep this Method: it owns the KV-cache state
    outs = [method.execute([prompt, torch.tensor([0])])[0]]
    pos = prompt.shape[1]
    for t in decode_tokens:
        outs.append(method.execute([t, torch.tensor([pos])])[0])
        pos += 1

    print("step  shape        max|pte-eager_same_quant|   max|pte-eager_fp32|   max|eager_fp32|  argmax_match_fp32")
    for i, (o, rq, rf) in enumerate(zip(outs, ref_q, ref_fp)):
        name = "prefill" if i == 0 else f"decode{i}"
        print(f"{name:8s} {str(tuple(o.shape)):12s} {(o - rq).abs().max().item():12.3e}"
              f"           {(o - rf).abs().max().item():12.3e}       {rf.abs().max().item():8.3f}"
              f"       {(o.argmax(-1) == rf.argmax(-1)).float().mean().item():.2f}")


    # ---------------- rough timing (tiny model: numbers are dominated by overhead) ----------------
    n = cfg.max_seq - prompt.shape[1] - 1
    m2 = program.load_method("forward")       # fresh Method == fresh (initial) KV cache
    # decode step at pos 7 after a fresh prefill must equal the first decode step above
    m2.execute([prompt, torch.tensor([0])])
    chk = m2.execute([decode_tokens[0], torch.tensor([prompt.shape[1]])])[0]
    print(f"fresh Method reproduces decode1: max diff {(chk - outs[1]).abs().max().item():.2e}")
    m2 = program.load_method("forward")
    m2.execute([prompt, torch.tensor([0])])
    tok = torch.tensor([[1]])
    t0 = time.perf_counter()
    for i in range(n):
        m2.execute([tok, torch.tensor([prompt.shape[1] + i])])
    t_et = (time.perf_counter() - t0) / n
    em = copy.deepcopy(model)
    with torch.no_grad():
        em(prompt, torch.tensor([0]))
        t0 = time.perf_counter()
        for i in range(n):
            em(tok, torch.tensor([prompt.shape[1] + i]))
    t_eager = (time.perf_counter() - t0) / n
    print(f"decode latency over {n} steps: executorch {t_et*1e3:.3f} ms/token, "
          f"eager torch ({args.quant}) {t_eager*1e3:.3f} ms/token")


if __name__ == "__main__":
    main()
