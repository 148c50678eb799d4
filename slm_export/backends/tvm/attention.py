"""Hand-written TIR kernels for the TVM decoder's attention (grouped-query heads, online softmax) and gated
SiLU; their exponentials are ``exp_f32``'s arithmetic, which stays in vector lanes (and needs no libm).
The attention's per-block loop nests are TVMScript macros expanded in its PrimFunc."""

from __future__ import annotations

from typing import Any

from slm_export.backends.tvm.kernels import divisor


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


def tanh_f32(x: Any) -> Any:
    """``tanh(x)`` as ``1 - 2 / (exp(2x) + 1)`` on ``exp_f32``: vector lanes, no libm (the aarch64 library
    needs only libc); saturates to +-1 where ``exp_f32`` clamps."""
    from tvm.script import tirx as T

    return T.float32(1) - T.float32(2) / (exp_f32(x * T.float32(2)) + T.float32(1))


def attention_kernel(heads: int, kv_heads: int, head_dim: int, block: int = 32, scale: float | None = None,
                     softcap: float | None = None) -> Any:
    """Grouped-query attention, one query row per task: ``q`` ``[b, heads, s, d]``, ``k``/``v`` ``[b, kv_heads,
    t, d]`` (the whole cache), additive ``mask`` ``[b, 1, s, t]`` -> ``[b, s, heads * d]`` (heads side by side,
    what the output projection reads). Softmax runs online over blocks of ``block`` keys (running max and
    sum, the accumulator rescaled per block), so no buffer grows with ``t``; the scores of four keys are
    summed at once (independent accumulators), and ``exp_f32`` keeps the exponentials in vector lanes."""
    from tvm.script import tirx as T

    d = head_dim
    lanes = divisor(d, (8, 4, 2, 1))
    quad = 4  # keys per dot-product group (block is a multiple of it)
    scores = _block_scores(heads, kv_heads, d, block, lanes, quad, scale, softcap)
    absorb = _block_absorb(heads, kv_heads, d, block)

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
                scores(q, k, mask, dot, sc, st, bi, h, si, tb, t)
                absorb(v, acc, sc, st, bi, h, tb, t)
            for c in T.vectorized(d):
                out[bi, si, h * d + c] = acc[c] / st[1]

    return kernel.with_attr("op_pattern", 8).with_attr("slm.kernel", True)


def _score_map(scale: float, softcap: float | None) -> Any:
    """The raw dot product -> the score: scaled, and soft-capped where the model asks for it."""
    from tvm.script import tirx as T

    if not softcap:
        return lambda x: x * T.float32(scale)
    return lambda x: tanh_f32(x * T.float32(scale / softcap)) * T.float32(softcap)


def _block_scores(heads: int, kv_heads: int, d: int, block: int, lanes: int, quad: int, scale: float | None,
                  softcap: float | None) -> Any:
    """Key block ``tb``'s scaled (and soft-capped), masked scores of query row (``bi``, ``h``, ``si``) into
    ``sc`` (keys past the end: -3e38), and their running maximum into ``st[2]``."""
    from tvm.script import tirx as T

    rep = heads // kv_heads
    capped = _score_map(float(d) ** -0.5 if scale is None else float(scale), softcap)

    @T.macro
    def scores(q: Any, k: Any, mask: Any, dot: Any, sc: Any, st: Any, bi: Any, h: Any, si: Any, tb: Any,
               t: Any) -> None:
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
                    sc[jq * quad + u] = capped(sc[jq * quad + u]) + mask[
                        bi, 0, si, tb * block + jq * quad + u]
                    st[2] = T.max(st[2], sc[jq * quad + u])

    return scores


def _block_absorb(heads: int, kv_heads: int, d: int, block: int) -> Any:
    """Online softmax over key block ``tb``: its exponentials, the running sum and accumulator rescaled to
    the new maximum, then the block's values added in."""
    from tvm.script import tirx as T

    rep = heads // kv_heads

    @T.macro
    def absorb(v: Any, acc: Any, sc: Any, st: Any, bi: Any, h: Any, tb: Any, t: Any) -> None:
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

    return absorb


def silu_mul_kernel(inter: int) -> Any:
    """The gated MLP's ``silu(gate) * up`` of ``h = [gate | up]`` ``[m, 2 * inter]`` -> ``[m, inter]``, with
    ``silu(g) = g / (1 + exp(-g))`` in vector lanes (``exp_f32``)."""
    from tvm.script import tirx as T

    chunk = divisor(inter, (64, 32, 16, 8, 4, 2, 1))
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
