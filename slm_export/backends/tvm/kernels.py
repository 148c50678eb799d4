"""Hand-written TIR kernels for the TVM decoder, and the glue that puts them into the graph.

Every Linear of the decoder (float or quantized, the tied LM head included) is one PrimFunc that reads
the weight as it is stored, ``[out, in]`` (float32, or uint8 codes with float32 scales and uint8 zero
points per group), and never materialises a transposed or dequantized copy of the whole matrix:

- prefill: output rows go in panels (up to 16, at most ``PANEL_BYTES`` as float32) across threads; a
  quantized panel is dequantized once into a stack buffer (``(code - zero) * scale``,
  ``QuantizedTensor.dequantize``'s arithmetic) that all input rows then read, six at a time, in a
  register tile of 6 x 2 dot products (8-lane vector accumulators, summed across lanes at the end);
- the rows left over (a decode step's single row) run in a parallel loop of their own, four output rows
  at a time, straight from the weight: int4 codes go into the dot products as they are and the zero
  point comes out of the group sums (``scale * (sum x code - zero * sum x)``), no dequantized copy;
- int4 codes are packed two to a byte in blocks of 16 input columns (``pack_int4``): byte ``8b + p`` of a
  row holds column ``16b + p`` in its low nibble and ``16b + 8 + p`` in its high one, so one 8-byte load
  gives two 8-lane vectors with a mask and a shift, no shuffles (NEON and AVX2 alike).

The attention (grouped-query heads, online softmax) and the gated SiLU are kernels too; their
exponentials are ``exp_f32``'s arithmetic, which stays in vector lanes (and needs no libm).

The PyTorch decoder calls the custom ops ``slm_export::tvm_linear`` / ``tvm_qlinear`` / ``tvm_attention``
/ ``tvm_silu_mul`` (``torch_ops``), which torch.export keeps as they are; ``convert_map`` turns them into
``call_tir`` of these kernels when Relax imports the program. The kernels carry ``op_pattern`` opaque
(FuseOps leaves them alone) and ``slm.kernel`` (``schedule`` does not reschedule them).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

ROW_TILE, COL_TILE, TAIL_TILE = 6, 2, 4  # input rows x output rows of the register tile; output rows of the tail
PANEL_BYTES = 20 * 1024  # a panel of weight rows at most this big (in float32): it stays in L1 with the rows


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """uint8 codes ``[out, in]`` (values < 16, ``in`` a multiple of 16) -> ``[out, in / 2]``: byte ``8b + p``
    holds column ``16b + p`` in its low nibble and column ``16b + 8 + p`` in its high nibble."""
    c = np.ascontiguousarray(codes, dtype=np.uint8)
    out, n = c.shape
    blocks = c.reshape(out, n // 16, 2, 8)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(out, n // 2).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """The inverse of ``pack_int4``: ``[out, in / 2]`` -> uint8 codes ``[out, in]``."""
    p = np.asarray(packed, np.uint8)
    out, half = p.shape
    blocks = p.reshape(out, half // 8, 1, 8)
    return np.concatenate([blocks & 15, blocks >> 4], 2).reshape(out, 2 * half)


def packs_int4(bits: int, in_features: int) -> bool:
    """Whether a ``bits``-wide weight with ``in_features`` columns is stored packed two codes a byte."""
    return bits == 4 and in_features % 16 == 0


def _divisor(n: int, options: tuple[int, ...]) -> int:
    return next(o for o in options if n % o == 0)


def linear_kernel(n: int, k: int, quant: str | None = None, group: int = 0, zero: float | None = None,
                  bias: bool = False) -> Any:
    """``out[m, j] = sum_i x[m, i] * w[j, i] (+ bias[j])`` for a dynamic ``m``, ``w`` ``[n, k]``.

    ``quant``: None (``w`` float32 ``[n, k]``), ``"int4"`` (``pack_int4`` codes ``[n, k / 2]``) or
    ``"byte"`` (one code per byte ``[n, k]``); with ``scales`` ``[n, k / group]`` and either ``zeros``
    (uint8, same shape) or the constant ``zero``. Parameters in order: x, weight or codes, scales,
    zeros, bias, out; the scales, zeros and bias of a variant without them are not read."""
    from tvm.script import tirx as T

    packed, is_q = quant == "int4", quant is not None
    lanes = 8 if packed else _divisor(k, (8, 4, 2, 1))
    kv = k // lanes
    panel = _divisor(n, tuple(p for p in (16, 8, 4, 2, 1) if p * k * 4 <= PANEL_BYTES or p == 1))
    # rows left over (a decode step's one row) read the weight itself in their own parallel loop: float, or
    # int4 codes with the zero point taken out of the group sums; other codes read the dequantized panel
    direct = not is_q or (packed and group % 16 == 0)
    vpanel = _divisor(n, (16, 8, 4, 2, 1)) if direct else panel
    ji, jt, mi = min(COL_TILE, panel), min(TAIL_TILE, vpanel), ROW_TILE
    ngroups = k // group if is_q else 1
    g_lane = is_q and group % lanes == 0  # each lane vector within one group
    per_group = zero is None
    dz = float(zero) if zero is not None else 0.0
    wshape = (n, k // 2) if packed else (n, k)
    wdtype = "uint8" if is_q else "float32"
    gemm_from = mi if direct else 0  # (the panel loop runs for m >= this)

    def zval(zeros: Any, j: Any, g: Any) -> Any:
        return T.Cast("float32", zeros[j, g]) if per_group else T.float32(dz)

    def qval(scales: Any, zeros: Any, j: Any, c: Any, col: Any, col0: Any) -> Any:
        """(code - zero) * scale of ``w[j, col]`` (code ``c``; ``col0`` the first column of its lane vector)."""
        g = col0 // group if g_lane else col // group
        return (T.Cast("float32", c) - zval(zeros, j, g)) * scales[j, g]

    def nibble(w: Any, j: Any, byte: Any, h: Any) -> Any:
        return (w[j, byte] >> T.uint8(4 * h)) & T.uint8(15)

    @T.prim_func(private=True)
    def kernel(a: T.handle, wh: T.handle, sh: T.handle, zh: T.handle, bh: T.handle, o: T.handle) -> None:
        # (the inputs a variant does not read stay untyped handles: the caller passes any tensor there)
        T.func_attr({"tirx.noalias": True})
        bsz, seq = T.int64(), T.int64()
        x3 = T.match_buffer(a, (bsz, seq, k), "float32")
        out3 = T.match_buffer(o, (bsz, seq, n), "float32")
        w = T.match_buffer(wh, wshape, wdtype)
        if is_q:
            scales = T.match_buffer(sh, (n, ngroups), "float32")
        if is_q and per_group:  # noqa: SIM108 (a TVMScript statement, evaluated while parsing)
            zeros = T.match_buffer(zh, (n, ngroups), "uint8")
        else:
            zeros = T.meta_var(None)
        if bias:
            b = T.match_buffer(bh, (n,), "float32")
        m = T.meta_var(bsz * seq)
        x = T.decl_buffer((m, k), "float32", data=x3.data)  # (rows flattened: batch and sequence alike)
        out = T.decl_buffer((m, n), "float32", data=out3.data)
        if m >= gemm_from:
            for jp in T.parallel(n // panel):
                wp = T.alloc_buffer((panel, k), "float32", scope="local")
                if packed:
                    for r, kb in T.grid(panel, k // 16):
                        for h in T.unroll(2):
                            for lane in T.vectorized(8):
                                wp[r, kb * 16 + h * 8 + lane] = qval(
                                    scales, zeros, jp * panel + r, nibble(w, jp * panel + r, kb * 8 + lane, h),
                                    kb * 16 + h * 8 + lane, kb * 16 + h * 8)
                elif is_q:
                    for r, kb in T.grid(panel, kv):
                        for lane in T.vectorized(lanes):
                            wp[r, kb * lanes + lane] = qval(scales, zeros, jp * panel + r,
                                                            w[jp * panel + r, kb * lanes + lane], kb * lanes + lane,
                                                            kb * lanes)
                for mo in range(m // mi):
                    for jo in range(panel // ji):
                        acc = T.alloc_buffer((mi, ji, lanes), "float32", scope="local")
                        for r, c in T.grid(mi, ji):
                            for lane in T.vectorized(lanes):
                                acc[r, c, lane] = T.float32(0)
                        for kb in range(kv):
                            for r in T.unroll(mi):
                                for c in T.unroll(ji):
                                    for lane in T.vectorized(lanes):
                                        if is_q:
                                            acc[r, c, lane] = acc[r, c, lane] + x[
                                                mo * mi + r, kb * lanes + lane] * wp[jo * ji + c, kb * lanes + lane]
                                        else:
                                            acc[r, c, lane] = acc[r, c, lane] + x[mo * mi + r, kb * lanes + lane] * w[
                                                jp * panel + jo * ji + c, kb * lanes + lane]
                        for r in T.unroll(mi):
                            for c in T.unroll(ji):
                                out[mo * mi + r, jp * panel + jo * ji + c] = T.float32(0)
                                if bias:
                                    out[mo * mi + r, jp * panel + jo * ji + c] = b[jp * panel + jo * ji + c]
                                for lane in range(lanes):
                                    out[mo * mi + r, jp * panel + jo * ji + c] = out[
                                        mo * mi + r, jp * panel + jo * ji + c] + acc[r, c, lane]
                if not direct:  # the rows left over, from the dequantized panel
                    for i in range(m // mi * mi, m):
                        for jo in range(panel // jt):
                            acc1 = T.alloc_buffer((jt, lanes), "float32", scope="local")
                            for c in T.unroll(jt):
                                for lane in T.vectorized(lanes):
                                    acc1[c, lane] = T.float32(0)
                            for kb in range(kv):
                                for c in T.unroll(jt):
                                    for lane in T.vectorized(lanes):
                                        acc1[c, lane] = acc1[c, lane] + x[i, kb * lanes + lane] * wp[
                                            jo * jt + c, kb * lanes + lane]
                            for c in T.unroll(jt):
                                out[i, jp * panel + jo * jt + c] = T.float32(0)
                                if bias:
                                    out[i, jp * panel + jo * jt + c] = b[jp * panel + jo * jt + c]
                                for lane in range(lanes):
                                    out[i, jp * panel + jo * jt + c] = out[i, jp * panel + jo * jt + c] + acc1[c, lane]
        if direct and m % mi > 0:
            for jp in T.parallel(n // vpanel):
                for i in range(m // mi * mi, m):
                    xs = T.alloc_buffer((ngroups, 8), "float32", scope="local")
                    part = T.alloc_buffer((jt, lanes), "float32", scope="local")
                    acc2 = T.alloc_buffer((jt, lanes), "float32", scope="local")
                    if is_q:  # sum_c x (code - zero) scale = scale (sum_c x code - zero sum_c x), per group
                        for g in range(ngroups):
                            for lane in T.vectorized(8):
                                xs[g, lane] = T.float32(0)
                            for kb in range(group // 8):
                                for lane in T.vectorized(8):
                                    xs[g, lane] = xs[g, lane] + x[i, g * group + kb * 8 + lane]
                    for jo in range(vpanel // jt):
                        for c in T.unroll(jt):
                            for lane in T.vectorized(lanes):
                                acc2[c, lane] = T.float32(0)
                        if is_q:
                            for g in range(ngroups):
                                for c in T.unroll(jt):
                                    for lane in T.vectorized(8):
                                        part[c, lane] = T.float32(0)
                                for kb in range(group // 16):
                                    for c in T.unroll(jt):
                                        for h in T.unroll(2):
                                            for lane in T.vectorized(8):
                                                part[c, lane] = part[c, lane] + x[
                                                    i, g * group + kb * 16 + h * 8 + lane] * T.Cast("float32", nibble(
                                                        w, jp * vpanel + jo * jt + c, g * (group // 2) + kb * 8 + lane,
                                                        h))
                                for c in T.unroll(jt):
                                    for lane in T.vectorized(8):
                                        acc2[c, lane] = acc2[c, lane] + scales[jp * vpanel + jo * jt + c, g] * (
                                            part[c, lane] - zval(zeros, jp * vpanel + jo * jt + c, g) * xs[g, lane])
                        else:
                            for kb in range(kv):
                                for c in T.unroll(jt):
                                    for lane in T.vectorized(lanes):
                                        acc2[c, lane] = acc2[c, lane] + x[i, kb * lanes + lane] * w[
                                            jp * vpanel + jo * jt + c, kb * lanes + lane]
                        for c in T.unroll(jt):
                            out[i, jp * vpanel + jo * jt + c] = T.float32(0)
                            if bias:
                                out[i, jp * vpanel + jo * jt + c] = b[jp * vpanel + jo * jt + c]
                            for lane in range(lanes):
                                out[i, jp * vpanel + jo * jt + c] = out[i, jp * vpanel + jo * jt + c] + acc2[c, lane]

    return kernel.with_attr("op_pattern", 8).with_attr("slm.kernel", True)


def exp_f32(x: Any) -> Any:
    """``exp(x)`` for float32 as plain arithmetic (Cephes' ``expf``: ``x = n ln2 + r``, a degree-7 polynomial
    in ``r``, ``2^n`` put in the exponent bits), so that vectorized loops stay vectors: LLVM turns a vector
    ``exp`` into one libm call per lane. Within 2 ulp of ``expf``; below -87.3 it is 0."""
    from tvm.script import tirx as T

    xc = T.max(T.min(x, T.float32(88.3)), T.float32(-87.3))
    n = T.floor(xc * T.float32(1.44269504088896341) + T.float32(0.5))
    r = xc - n * T.float32(0.693359375) + n * T.float32(2.12194440e-4)
    p = T.float32(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + T.float32(c)
    bits = T.shift_left(T.Cast("int32", n) + T.int32(127), T.int32(23))
    return T.Select(x < T.float32(-87.3), T.float32(0), (p * r * r + r + T.float32(1)) * T.reinterpret("float32", bits))


def attention_kernel(heads: int, kv_heads: int, head_dim: int, block: int = 32) -> Any:
    """Grouped-query attention, one query row per task: ``q`` ``[b, heads, s, d]``, ``k``/``v`` ``[b, kv_heads,
    t, d]`` (the whole cache), additive ``mask`` ``[b, 1, s, t]`` -> ``[b, s, heads * d]`` (heads side by side,
    what the output projection reads). Softmax runs online over blocks of ``block`` keys (running max and
    sum, the accumulator rescaled per block), so no buffer grows with ``t``; the scores of four keys are
    summed at once (independent accumulators), and ``exp_f32`` keeps the exponentials in vector lanes."""
    from tvm.script import tirx as T

    rep, d = heads // kv_heads, head_dim
    lanes = _divisor(d, (8, 4, 2, 1))
    scale = float(d) ** -0.5
    quad = 4  # keys per dot-product group (block is a multiple of it)

    @T.prim_func(private=True)
    def kernel(qh: T.handle, kh: T.handle, vh: T.handle, mh: T.handle, oh: T.handle) -> None:
        T.func_attr({"tirx.noalias": True})
        b, s, t = T.int64(), T.int64(), T.int64()
        q = T.match_buffer(qh, (b, heads, s, d), "float32")
        k = T.match_buffer(kh, (b, kv_heads, t, d), "float32")
        v = T.match_buffer(vh, (b, kv_heads, t, d), "float32")
        mask = T.match_buffer(mh, (b, 1, s, t), "float32")
        out = T.match_buffer(oh, (b, s, heads * d), "float32")
        for row in T.parallel(b * heads * s):
            acc = T.alloc_buffer((d,), "float32", scope="local")
            dot = T.alloc_buffer((quad, lanes), "float32", scope="local")
            sc = T.alloc_buffer((block,), "float32", scope="local")
            st = T.alloc_buffer((3,), "float32", scope="local")  # running max, running sum, this block's max
            bi = row // (heads * s)
            h = row // s % heads
            si = row % s
            for c in T.vectorized(d):
                acc[c] = T.float32(0)
            st[0] = T.float32(-3.0e38)
            st[1] = T.float32(0)
            for tb in range((t + block - 1) // block):
                st[2] = st[0]
                for jq in range(block // quad):
                    for u in T.unroll(quad):
                        for lane in T.vectorized(lanes):
                            dot[u, lane] = T.float32(0)
                    for c in range(d // lanes):
                        for u in T.unroll(quad):
                            for lane in T.vectorized(lanes):  # (keys past the end read the last one, unused)
                                dot[u, lane] = dot[u, lane] + q[bi, h, si, c * lanes + lane] * k[
                                    bi, h // rep, T.min(tb * block + jq * quad + u, t - 1), c * lanes + lane]
                    for u in T.unroll(quad):
                        sc[jq * quad + u] = T.float32(-3.0e38)
                        if tb * block + jq * quad + u < t:
                            sc[jq * quad + u] = T.float32(0)
                            for lane in range(lanes):
                                sc[jq * quad + u] = sc[jq * quad + u] + dot[u, lane]
                            sc[jq * quad + u] = sc[jq * quad + u] * T.float32(scale) + mask[
                                bi, 0, si, tb * block + jq * quad + u]
                            st[2] = T.max(st[2], sc[jq * quad + u])
                for j in T.vectorized(block):  # (keys past the end: exp of -3e38, 0)
                    sc[j] = exp_f32(sc[j] - st[2])
                st[1] = st[1] * exp_f32(st[0] - st[2])
                for c in T.vectorized(d):
                    acc[c] = acc[c] * exp_f32(st[0] - st[2])
                st[0] = st[2]
                for j in range(block):
                    if tb * block + j < t:
                        st[1] = st[1] + sc[j]
                        for c in T.vectorized(d):
                            acc[c] = acc[c] + sc[j] * v[bi, h // rep, tb * block + j, c]
            for c in T.vectorized(d):
                out[bi, si, h * d + c] = acc[c] / st[1]

    return kernel.with_attr("op_pattern", 8).with_attr("slm.kernel", True)


def silu_mul_kernel(inter: int) -> Any:
    """The gated MLP's ``silu(gate) * up`` of ``h = [gate | up]`` ``[m, 2 * inter]`` -> ``[m, inter]``, with
    ``silu(g) = g / (1 + exp(-g))`` in vector lanes (``exp_f32``)."""
    from tvm.script import tirx as T

    chunk = _divisor(inter, (64, 32, 16, 8, 4, 2, 1))
    nb = inter // chunk

    @T.prim_func(private=True)
    def kernel(gh: T.handle, uh: T.handle, oh: T.handle) -> None:
        # (h comes in twice, for the gates and for the ups: Relax's RewriteDataflowReshape takes a call_tir of
        # one input buffer for a possible reshape, and then fails on a function without sblocks)
        T.func_attr({"tirx.noalias": True})
        bsz, seq = T.int64(), T.int64()
        g3 = T.match_buffer(gh, (bsz, seq, 2 * inter), "float32")
        u3 = T.match_buffer(uh, (bsz, seq, 2 * inter), "float32")
        out3 = T.match_buffer(oh, (bsz, seq, inter), "float32")
        m = T.meta_var(bsz * seq)
        g = T.decl_buffer((m, 2 * inter), "float32", data=g3.data)
        u = T.decl_buffer((m, 2 * inter), "float32", data=u3.data)
        out = T.decl_buffer((m, inter), "float32", data=out3.data)
        for blk in T.parallel(m * nb):
            for c in T.vectorized(chunk):
                out[blk // nb, blk % nb * chunk + c] = g[blk // nb, blk % nb * chunk + c] / (
                    T.float32(1) + exp_f32(T.float32(0) - g[blk // nb, blk % nb * chunk + c])) * u[
                    blk // nb, inter + blk % nb * chunk + c]

    return kernel.with_attr("op_pattern", 8).with_attr("slm.kernel", True)


@cache
def torch_ops() -> Any:
    """The custom ops the PyTorch decoder's linears call (registered once a process): ``tvm_linear(x,
    weight, bias)`` and ``tvm_qlinear(x, codes, scales, zeros, bias, group, zero, packed)``; their eager
    forms compute the same product in PyTorch."""
    import torch
    import torch.nn.functional as F

    lib = "slm_export::"

    @torch.library.custom_op(lib + "tvm_linear", mutates_args=(), schema="(Tensor x, Tensor weight, Tensor? bias) "
                                                                         "-> Tensor")
    def tvm_linear(x: Any, weight: Any, bias: Any) -> Any:
        return F.linear(x, weight, bias)

    @tvm_linear.register_fake
    def _(x: Any, weight: Any, bias: Any) -> Any:
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.custom_op(lib + "tvm_qlinear", mutates_args=(), schema=(
        "(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor? bias, int group, float zero, bool packed) "
        "-> Tensor"))
    def tvm_qlinear(x: Any, codes: Any, scales: Any, zeros: Any, bias: Any, group: int, zero: float,
                    packed: bool) -> Any:
        c = torch.from_numpy(unpack_int4(codes.numpy())) if packed else codes
        out_f, in_f = c.shape
        w = c.reshape(out_f, in_f // group, group).to(torch.float32)
        z = zero if zeros is None else zeros.to(torch.float32)[:, :, None]
        return F.linear(x, ((w - z) * scales[:, :, None]).reshape(out_f, in_f), bias)

    @tvm_qlinear.register_fake
    def _(x: Any, codes: Any, scales: Any, zeros: Any, bias: Any, group: int, zero: float, packed: bool) -> Any:
        return x.new_empty((*x.shape[:-1], codes.shape[0]))

    @torch.library.custom_op(lib + "tvm_attention", mutates_args=(), schema="(Tensor q, Tensor k, Tensor v, "
                                                                            "Tensor mask) -> Tensor")
    def tvm_attention(q: Any, k: Any, v: Any, mask: Any) -> Any:
        b, heads, s, d = q.shape
        kv = k.shape[1]
        qg = (q * d ** -0.5).reshape(b, kv, heads // kv, s, d)
        scores = qg @ k.transpose(2, 3)[:, :, None] + mask[:, :, None]
        ctx = torch.softmax(scores, -1) @ v[:, :, None]  # [b, kv, rep, s, d]
        return ctx.permute(0, 3, 1, 2, 4).reshape(b, s, heads * d)

    @tvm_attention.register_fake
    def _(q: Any, k: Any, v: Any, mask: Any) -> Any:
        return q.new_empty((q.shape[0], q.shape[2], q.shape[1] * q.shape[3]))

    @torch.library.custom_op(lib + "tvm_silu_mul", mutates_args=(), schema="(Tensor h) -> Tensor")
    def tvm_silu_mul(h: Any) -> Any:
        gate, up = h.chunk(2, -1)
        return gate * torch.sigmoid(gate) * up

    @tvm_silu_mul.register_fake
    def _(h: Any) -> Any:
        return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))

    return torch.ops.slm_export


def convert_map() -> dict[str, Any]:
    """``custom_convert_map`` for ``from_exported_program``: the ``torch_ops`` linears as ``call_tir`` of
    ``linear_kernel`` (one PrimFunc per distinct shape and variant, shared by the layers)."""
    funcs: dict[tuple[Any, ...], Any] = {}

    def rows3(bb: Any, x: Any) -> tuple[Any, list[Any]]:
        """``x`` as ``[batch, seq, features]`` (the kernels' input; a reshape only for another rank)."""
        from tvm import relax

        shape = list(x.ty.shape.values)
        if len(shape) == 3:
            return x, shape
        rows = shape[0]
        for d in shape[1:-1]:
            rows = rows * d
        return bb.emit(relax.op.reshape(x, [1, rows, shape[-1]])), shape

    def call(bb: Any, func: Any, x: Any, args: list[Any], width: int) -> Any:
        from tvm import relax

        x3, shape = rows3(bb, x)
        lead = list(x3.ty.shape.values)[:-1]
        out = bb.emit(relax.call_tir(func, [x3, *args], relax.TensorType([*lead, width], "float32")))
        return out if len(shape) == 3 else bb.emit(relax.op.reshape(out, [*shape[:-1], width]))

    def emit(importer: Any, x: Any, weight: Any, extra: list[Any], key: tuple[Any, ...]) -> Any:
        bb = importer.block_builder
        n = int(weight.ty.shape.values[0])
        if key not in funcs:
            funcs[key] = bb.add_func(linear_kernel(n, *key[1:]), f"slm_linear_{len(funcs)}")
        return call(bb, funcs[key], x, [weight, *(weight if a is None else a for a in extra)], n)

    def linear(node: Any, importer: Any) -> Any:
        x, weight, bias = importer.retrieve_args(node)
        k = int(x.ty.shape.values[-1])
        return emit(importer, x, weight, [None, None, bias], (int(weight.ty.shape.values[0]), k, None, 0,
                                                            None, bias is not None))

    def qlinear(node: Any, importer: Any) -> Any:
        x, codes, scales, zeros, bias, group, zero, packed = importer.retrieve_args(node)
        k = int(x.ty.shape.values[-1])
        key = (int(codes.ty.shape.values[0]), k, "int4" if packed else "byte", int(group),
               None if zeros is not None else float(zero), bias is not None)
        return emit(importer, x, codes, [scales, zeros, bias], key)

    def attention(node: Any, importer: Any) -> Any:
        from tvm import relax

        q, k, v, mask = importer.retrieve_args(node)
        b, heads, s, d = q.ty.shape.values
        key = (int(heads), int(k.ty.shape.values[1]), int(d))
        if key not in funcs:
            funcs[key] = importer.block_builder.add_func(attention_kernel(*key), f"slm_attention_{len(funcs)}")
        out = relax.TensorType([b, s, heads * d], "float32")
        return importer.block_builder.emit(relax.call_tir(funcs[key], [q, k, v, mask], out))

    def silu_mul(node: Any, importer: Any) -> Any:
        (h,) = importer.retrieve_args(node)
        bb = importer.block_builder
        inter = int(h.ty.shape.values[-1]) // 2
        key = ("silu", inter)
        if key not in funcs:
            funcs[key] = bb.add_func(silu_mul_kernel(inter), f"slm_silu_mul_{len(funcs)}")
        h3, _ = rows3(bb, h)
        return call(bb, funcs[key], h, [h3], inter)

    return {"tvm_linear.default": linear, "tvm_qlinear.default": qlinear, "tvm_attention.default": attention,
            "tvm_silu_mul.default": silu_mul}
