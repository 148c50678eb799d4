#!/usr/bin/env python3
"""Tiny llama-like decoder -> ONNX / torch.export -> TVM Relax -> host llvm + aarch64 cross build.

Tested with: Python 3.11.7 (x86_64, Debian 12), torch 2.13.0+cpu, apache-tvm 0.27.0.post1,
apache-tvm-ffi 0.1.15.post2, onnx 1.23.2, onnxscript 0.7.2, onnxruntime 1.32.0, numpy 2.4.6.
Cross compiler: Debian 12 gcc-aarch64-linux-gnu 12.2.

Sub-commands
  build  [--out DIR] [--seq N] [--frontend onnx|torch|both] [--dynamic] [--cross]
         exports the model, imports it into Relax, compiles for the host (llvm), runs it with
         relax.VirtualMachine, compares with torch and onnxruntime; with --cross also compiles for
         the Raspberry Pi 4 target and writes DIR/<name>_aarch64.so + DIR/ref.npz.
  run    --lib X.so --ref ref.npz
         loads a compiled library (any arch) and checks it against ref.npz. Imports only numpy and
         tvm, so it is what runs under qemu-aarch64 with the aarch64 apache-tvm wheel.

Example:
  taskset -c 1 python tvm_demo.py build --out /tmp/tvmr/art --frontend both --cross
  qemu-aarch64-static -cpu cortex-a72 -L SYSROOT SYSROOT/usr/bin/python3 tvm_demo.py run \
      --lib /tmp/tvmr/art/onnx_aarch64.so --ref /tmp/tvmr/art/ref.npz
"""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np

RPI4_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72",
               "mattr": ["+neon"], "num-cores": 4}
CFG = dict(vocab=512, dim=64, n_layers=2, n_heads=4, ffn=176, max_seq=64)
CONFIGS = {"tiny": CFG,
           # SmolLM2-135M shapes (MHA instead of its 3-KV-head GQA; random weights): 162M params
           "smollm2": dict(vocab=49152, dim=576, n_layers=30, n_heads=9, ffn=1536, max_seq=2048)}


# ----------------------------------------------------------------------------- model (torch)
def make_model(seed=0, rope_mode="compute"):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class RMSNorm(nn.Module):
        def __init__(self, d, eps=1e-5):
            super().__init__()
            self.w = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))
            self.eps = eps

        def forward(self, x):
            return self.w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def rope(x, cos, sin):  # x [B,H,S,D]
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            d, self.h = c["dim"], c["n_heads"]
            self.hd = d // self.h
            self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
            self.gate = nn.Linear(d, c["ffn"], bias=False)
            self.up = nn.Linear(d, c["ffn"], bias=False)
            self.down = nn.Linear(c["ffn"], d, bias=False)

        def forward(self, x, cos, sin):
            B, S, D = x.shape
            h = self.n1(x)
            q = self.q(h).view(B, S, self.h, self.hd).transpose(1, 2)
            k = self.k(h).view(B, S, self.h, self.hd).transpose(1, 2)
            v = self.v(h).view(B, S, self.h, self.hd).transpose(1, 2)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o(a.transpose(1, 2).reshape(B, S, D))
            h = self.n2(x)
            return x + self.down(F.silu(self.gate(h)) * self.up(h))

    class TinyLlama(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.emb = nn.Embedding(c["vocab"], c["dim"])
            self.blocks = nn.ModuleList(Block(c) for _ in range(c["n_layers"]))
            self.norm = RMSNorm(c["dim"])
            self.lm_head = nn.Linear(c["dim"], c["vocab"], bias=False)
            hd = c["dim"] // c["n_heads"]
            inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
            f = torch.outer(torch.arange(c["max_seq"]).float(), inv)
            f = torch.cat((f, f), dim=-1)
            self.register_buffer("cos", f.cos(), persistent=False)
            self.register_buffer("sin", f.sin(), persistent=False)
            self.register_buffer("inv", inv, persistent=False)

        def forward(self, input_ids, position_ids=None):
            S = input_ids.shape[1]
            if rope_mode == "posids":  # HF/Optimum style: position_ids is a graph input [1, S]
                f = position_ids.to(torch.float32)[:, :, None] * self.inv[None, None, :]
                f = torch.cat((f, f), dim=-1)[:, None]          # [1,1,S,D]
                cos, sin = f.cos(), f.sin()
            elif rope_mode == "slice":   # slice a precomputed table (breaks TVM torch frontend w/ dynamic S)
                cos, sin = self.cos[:S], self.sin[:S]
            else:                      # HF-llama style: angles from positions, computed on the fly
                f = torch.arange(S, dtype=torch.float32)[:, None] * self.inv[None, :]
                f = torch.cat((f, f), dim=-1)
                cos, sin = f.cos(), f.sin()
            x = self.emb(input_ids)
            for b in self.blocks:
                x = b(x, cos, sin)
            return self.lm_head(self.norm(x))

    torch.manual_seed(seed)
    return TinyLlama(CFG).eval()


# ----------------------------------------------------------------------------- helpers
def T():
    return time.perf_counter()


def log(msg):
    print(msg, flush=True)


def to_tvm(a):
    import tvm
    return tvm.runtime.tensor(a, tvm.cpu())


def vm_run(vm, xs, n_iter=20):
    """xs: list of numpy inputs (in graph-input order)."""
    out = vm["main"](*[to_tvm(x) for x in xs])
    if not hasattr(out, "numpy"):      # unwrap a 1-tuple
        out = out[0]
    res = out.numpy()
    t0 = T()
    for _ in range(n_iter):
        vm["main"](*[to_tvm(x) for x in xs])
    return res, (T() - t0) / n_iter * 1e3


def dlight_pipeline(target):
    """Default CPU pipeline + dlight CPU rules (GEMV, Reduction) applied after legalization."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cp
    from tvm.s_tir import dlight as dl

    @tvm.transform.module_pass(opt_level=0)
    def _p(mod, _ctx):
        with target:
            return tvm.transform.Sequential(
                cp.library_dispatch_passes(target) + cp.legalize_passes(target)
                + [dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction())]
                + cp.dataflow_lower_passes(target) + cp.finalize_passes(target))(mod)
    return _p


def compile_relax(mod, target, label, schedule="default", tune_trials=0, work_dir=None):
    import tvm
    from tvm import relax
    target = tvm.target.Target(target)
    t0 = T()
    if schedule == "dlight":
        ex = tvm.compile(mod, target=target, relax_pipeline=dlight_pipeline(target))
    elif schedule == "tune":   # MetaSchedule: measures candidates on THIS machine -> host only
        mod = relax.get_pipeline("static_shape_tuning", total_trials=tune_trials, target=target,
                                 work_dir=work_dir, max_trials_per_task=max(8, tune_trials // 16))(mod)
        ex = tvm.compile(mod, target=target)
    else:
        ex = tvm.compile(mod, target=target)
    dt = T() - t0
    log(f"[{label}] tvm.compile: {dt:.1f} s")
    return ex, dt


# ----------------------------------------------------------------------------- build
def cmd_build(a):
    import torch
    import tvm
    from tvm import relax
    os.makedirs(a.out, exist_ok=True)
    torch.set_num_threads(1)
    info = {"tvm": tvm.__version__, "torch": torch.__version__, "seq": a.seq, "dynamic": a.dynamic,
            "host_native": a.host_native, "config": a.config, "schedule": a.schedule,
            "rope": a.rope, "exporter": a.exporter}
    CFG.update(CONFIGS[a.config])
    model = make_model(rope_mode=a.rope)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CFG["vocab"], size=(1, a.seq), dtype=np.int64)
    inputs = {"input_ids": ids}
    if a.rope == "posids":
        inputs["position_ids"] = np.arange(a.seq, dtype=np.int64)[None]
    names = list(inputs)
    targs = tuple(torch.from_numpy(v) for v in inputs.values())
    with torch.no_grad():
        ref = model(*targs).numpy()
    np.savez(os.path.join(a.out, "ref.npz"), logits=ref, **inputs)
    log(f"torch reference logits {ref.shape}, n_params={sum(p.numel() for p in model.parameters())}")

    mods = {}
    if a.frontend in ("onnx", "both"):
        import onnx
        import onnxruntime as ort
        onnx_path = os.path.join(a.out, "tiny.onnx")
        seqd = torch.export.Dim("seq", min=2, max=CFG["max_seq"])
        dyn = {n: {1: seqd} for n in names} if a.dynamic else None
        t0 = T()
        if a.exporter == "dynamo":
            torch.onnx.export(model, targs, onnx_path, dynamo=True,
                              opset_version=a.opset, input_names=names,
                              output_names=["logits"], dynamic_shapes=dyn, external_data=False)
        else:  # legacy TorchScript exporter
            torch.onnx.export(model, targs, onnx_path, dynamo=False,
                              opset_version=a.opset, input_names=names,
                              output_names=["logits"],
                              dynamic_axes={n: {1: "seq"} for n in names} if a.dynamic else None)
        info["onnx_export_s"] = T() - t0
        m = onnx.load(onnx_path)
        if a.fold:   # constant-fold shape arithmetic; needed for the legacy exporter (static dims)
            import onnxscript.optimizer
            m = onnxscript.optimizer.optimize(m)
        ops = sorted({n.op_type for n in m.graph.node})
        info["onnx_opset"] = [(o.domain, o.version) for o in m.opset_import]
        info["onnx_ops"] = ops
        log(f"ONNX export {info['onnx_export_s']:.1f} s, opset {info['onnx_opset']}, ops {ops}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        ort_out = sess.run(None, inputs)[0]
        t0 = T()
        for _ in range(20):
            sess.run(None, inputs)
        info["ort_ms"] = (T() - t0) / 20 * 1e3
        info["ort_vs_torch"] = float(np.abs(ort_out - ref).max())
        log(f"onnxruntime {ort.__version__}: max|ort-torch|={info['ort_vs_torch']:.2e}, {info['ort_ms']:.3f} ms/run")
        from tvm.relax.frontend.onnx import from_onnx
        t0 = T()
        shape_dict = None if a.dynamic else {n: [1, a.seq] for n in names}
        mods["onnx"] = from_onnx(m, shape_dict=shape_dict, dtype_dict={n: "int64" for n in names})
        info["onnx_import_s"] = T() - t0
        log(f"Relax from_onnx: {info['onnx_import_s']:.1f} s")

    if a.frontend in ("torch", "both"):
        from tvm.relax.frontend.torch import from_exported_program
        seqd = torch.export.Dim("seq", min=2, max=CFG["max_seq"])
        dyn = {n: {1: seqd} for n in names} if a.dynamic else None
        t0 = T()
        with torch.no_grad():
            ep = torch.export.export(model, targs, dynamic_shapes=dyn)
        info["torch_export_s"] = T() - t0
        t0 = T()
        mods["torch"] = from_exported_program(ep, unwrap_unit_return_tuple=True)
        info["torch_import_s"] = T() - t0
        log(f"torch.export {info['torch_export_s']:.1f} s, from_exported_program {info['torch_import_s']:.1f} s")

    for name, mod in mods.items():
        with open(os.path.join(a.out, f"{name}_relax.py"), "w") as f:
            f.write(mod.script())
        host_t = {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()} \
            if a.host_native else {"kind": "llvm"}
        if a.schedule == "tune":     # MetaSchedule insists on num-cores
            host_t["num-cores"] = len(os.sched_getaffinity(0))
        ex, dt = compile_relax(mod, host_t, f"{name}/host", a.schedule, a.tune_trials,
                               os.path.join(a.out, f"ms_{name}"))
        info[f"{name}_host_compile_s"] = dt
        host_so = os.path.join(a.out, f"{name}_host.so")
        ex.export_library(host_so)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        out, ms = vm_run(vm, list(inputs.values()))
        err = float(np.abs(out - ref).max())
        info[f"{name}_host_vs_torch"] = err
        info[f"{name}_host_ms"] = ms
        log(f"[{name}/host] max|tvm-torch|={err:.2e}, argmax equal={bool((out.argmax(-1)==ref.argmax(-1)).all())}, {ms:.3f} ms/run (1 thread? TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')})")
        if a.dynamic:  # same compiled module, another length
            s2 = max(2, a.seq // 2)
            half = [v[:, :s2] for v in inputs.values()]
            with torch.no_grad():
                r2 = model(*(torch.from_numpy(v) for v in half)).numpy()
            o2, _ = vm_run(vm, half, 1)
            info[f"{name}_host_dyn_seq{s2}_err"] = float(np.abs(o2 - r2).max())
            log(f"[{name}/host] dynamic seq={s2}: max err {info[f'{name}_host_dyn_seq{s2}_err']:.2e}")
        if a.cross:
            ex, dt = compile_relax(mod, RPI4_TARGET, f"{name}/aarch64",
                                   "dlight" if a.schedule == "dlight" else "default")
            info[f"{name}_aarch64_compile_s"] = dt
            so = os.path.join(a.out, f"{name}_aarch64.so")
            t0 = T()
            ex.export_library(so, cc=a.cc)
            info[f"{name}_aarch64_export_s"] = T() - t0
            info[f"{name}_aarch64_so_bytes"] = os.path.getsize(so)
            log(f"[{name}/aarch64] export_library(cc={a.cc}): {info[f'{name}_aarch64_export_s']:.1f} s, {os.path.getsize(so)} bytes -> {so}")
    with open(os.path.join(a.out, "build_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    log(json.dumps(info, indent=1))


# ----------------------------------------------------------------------------- run (any arch)
def cmd_run(a):
    t0 = T()
    import tvm                       # TVM_USE_RUNTIME_LIB=1 -> loads only libtvm_runtime.so
    from tvm.runtime.vm import VirtualMachine
    t_imp = T() - t0
    r = np.load(a.ref)
    ref = r["logits"]
    xs = [r[k] for k in ("input_ids", "position_ids") if k in r.files]
    t0 = T()
    lib = tvm.runtime.load_module(a.lib)
    vm = VirtualMachine(lib, tvm.cpu())
    t_load = T() - t0
    out, ms = vm_run(vm, xs, a.iters)
    err = float(np.abs(out - ref).max())
    same = bool((out.argmax(-1) == ref.argmax(-1)).all())
    log(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                    "tvm": tvm.__version__,
                    "runtime_only": bool(getattr(tvm.base, "_RUNTIME_ONLY", None)),
                    "TVM_NUM_THREADS": os.environ.get("TVM_NUM_THREADS"), "import_tvm_s": round(t_imp, 2),
                    "load_s": round(t_load, 2), "max_abs_err": err, "argmax_equal": same,
                    "ms_per_run": round(ms, 3)}))
    bad = err > 1e-3 or not same
    if a.onnx:   # same check with onnxruntime (under QEMU needs the faked /proc/cpuinfo: qemu_setup.sh apy)
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(a.onnx, so, providers=["CPUExecutionProvider"])
        feeds = {i.name: x for i, x in zip(sess.get_inputs(), xs)}
        o = sess.run(None, feeds)[0]
        t0 = T()
        for _ in range(a.iters):
            sess.run(None, feeds)
        e2 = float(np.abs(o - ref).max())
        log(json.dumps({"onnxruntime": ort.__version__, "max_abs_err": e2,
                        "argmax_equal": bool((o.argmax(-1) == ref.argmax(-1)).all()),
                        "ms_per_run": round((T() - t0) / a.iters * 1e3, 3)}))
        bad = bad or e2 > 1e-3
    if bad:
        sys.exit(1)


def main():
    p = argparse.ArgumentParser()
    sp = p.add_subparsers(dest="cmd", required=True)
    b = sp.add_parser("build")
    b.add_argument("--out", default="/tmp/tvmr/art")
    b.add_argument("--seq", type=int, default=16)
    b.add_argument("--opset", type=int, default=17)
    b.add_argument("--frontend", choices=["onnx", "torch", "both"], default="both")
    b.add_argument("--dynamic", action="store_true")
    b.add_argument("--rope", choices=["compute", "slice", "posids"], default="compute")
    b.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo")
    b.add_argument("--cross", action="store_true")
    b.add_argument("--fold", action="store_true",
                   help="run onnxscript.optimizer.optimize on the ONNX model before from_onnx")
    b.add_argument("--config", choices=list(CONFIGS), default="tiny")
    b.add_argument("--schedule", choices=["default", "dlight", "tune"], default="default",
                   help="tune = MetaSchedule on the host build only (static shapes)")
    b.add_argument("--tune-trials", type=int, default=64)
    b.add_argument("--host-native", action="store_true",
                   help="host target mcpu=<this CPU> (e.g. znver3) instead of generic x86-64")
    b.add_argument("--cc", default="aarch64-linux-gnu-gcc")
    r = sp.add_parser("run")
    r.add_argument("--lib", required=True)
    r.add_argument("--ref", required=True)
    r.add_argument("--iters", type=int, default=5)
    r.add_argument("--onnx", help="also run this ONNX model with onnxruntime and compare")
    a = p.parse_args()
    (cmd_build if a.cmd == "build" else cmd_run)(a)


if __name__ == "__main__":
    main()
