"""Mixture-of-experts FFN: a router picks k of E SwiGLU experts per token, and their
outputs are summed with the router's weights.

The experts' weights are stacked per kind (`w_gate[E,F,D]`, `w_up[E,F,D]`, `w_down[E,D,F]`)
and each token reads only the rows of the k experts it picked: the contractions index the
stacked weight with the token's expert id inside the loop body (a gather fused into the
contraction), so no expert runs on a token that did not pick it and no gathered copy of
the weights is made (`moe_ffn`, the decode form). `moe_ffn_grouped` (prefill) orders the
(token, slot) pairs by expert and runs one matmul chain per expert over its rows, reading
each expert's weights once.

An expert stack may also be kept quantized (`--keep-quantized`): the weight is then
`(format, fields)`, each field stacked `[E, O, I/block, ...]` (halo_mlir.quantization.blocks). The decode
form calls the `{format}_expert_matmul` kernel, which reads the picked expert's blocks
inside its contraction and dequantizes them there; the grouped form slices each expert's
fields and runs the dense `{format}_matmul` kernel on its rows.

In an fp8 model (`--dtype fp8`) a stack is `("fp8", [qs [E, O, I] f8E4M3FNUZ, d [E] (or
[E, O] per-channel) f32, rscale [] f32])`: a weight scale per expert (and row) and one input
scale for every expert. The
input is quantized once (x / rscale), the fp8 products accumulate in f32, and both scales
are applied after the contraction (d of the token's expert), as `ops/fp8.fp8_linear` does.
"""

from __future__ import annotations

import math

from halo_mlir import kernels
from halo_mlir.ir_builder import Builder, Value
from halo_mlir.ops.fp8 import quantize as fp8_quantize
from halo_mlir.ops.linear import linear

# A stacked expert weight: a float Value [E, O, I], (format, fields [E, O, I/block, ...])
# kept quantized, or ("fp8", [qs, d, rscale]).
Experts = "Value | tuple[str, list[Value]]"


def _softmax(b: Builder, logits: Value) -> Value:
    """logits[N,S,E] -> softmax over E, in f32."""
    n, s, e = b.dims(logits)
    x = b.map("bse->bse", [logits], "f32", lambda v: b.cast(v, "f32"))
    top = b.generic("bse->bs", [x], [b.filled([n, s], float("-inf"), "f32")],
                    lambda v, acc: b.maxf(v, acc))
    ex = b.map("bse,bs->bse", [x, top], "f32", lambda v, m: b.exp(b.subf(v, m)))
    total = b.generic("bse->bs", [ex], [b.filled([n, s], 0.0, "f32")], b.addf)
    return b.map("bse,bs->bse", [ex, total], "f32", b.divf)


def top_k(b: Builder, probs: Value, k: int, *, renormalize: bool = False
          ) -> tuple[Value, Value]:
    """probs[N,S,E] f32 -> (the k largest [N,S,K] f32, their experts [N,S,K] i64), largest
    first; of equal values the lower expert comes first (torch.topk orders exact ties its
    own way; real router probabilities do not tie); with `renormalize` the k weights are
    divided by their sum. The `moe_topk` kernel: an expert's slot is its rank (how many
    experts beat it), an order-free count, so it does not depend on how the reduction is
    tiled."""
    n, s, e = b.dims(probs)
    rows = b.retype(b.reshape(probs, [[0, 1], [2]], [None, e]), [None, e])
    fn = kernels.instantiate(b, "moe_topk", e=e, k=k, renormalize=int(renormalize))
    vals, idx = b.call(fn, [rows], [b.tensor_type([None, k], "f32"),
                                    b.tensor_type([None, k], "i64")])
    return (b.reshape(vals, [[0, 1], [2]], [n, s, k]),
            b.reshape(idx, [[0, 1], [2]], [n, s, k]))


def route(b: Builder, x: Value, w_router: Value, *, k: int, renormalize: bool,
          dtype: str) -> tuple[Value, Value]:
    """x[N,S,D], w_router[E,D] -> (weights [N,S,K] f32, experts [N,S,K] i64): softmax of the
    router logits (computed in dtype, as the reference does) in f32, top k, and with
    `renormalize` the k weights divided by their sum (Mixtral; Grok-1 keeps them)."""
    probs = _softmax(b, linear(b, x, w_router, dtype=dtype))
    return top_k(b, probs, k, renormalize=renormalize)


def expert_linear(b: Builder, x: Value, experts: Value, w: Experts, *, dtype: str) -> Value:
    """x[N,S,K,I] (or [N,S,I], shared by the K slots), experts[N,S,K] i64, w[E,O,I] ->
    y[N,S,K,O] = x @ w[expert]^T, accumulated in f32, cast to dtype. The weight rows are
    read where the token's expert id points (a gather inside the contraction)."""
    if isinstance(w, tuple) and w[0] == "fp8":
        return fp8_expert_linear(b, x, experts, *w[1], dtype=dtype)
    if isinstance(w, tuple):
        return quantized_expert_linear(b, x, experts, *w, dtype=dtype)
    n, s, k = b.dims(experts)
    e, o, i = b.shape(w)
    if str(b.element_type(w)) != dtype or str(b.element_type(x)) != dtype:
        return _inline_expert_linear(b, x, experts, w, dtype=dtype)
    fn = kernels.instantiate(b, "expert_matmul", e=e, n=o, k=i, dtype=dtype,
                             **({} if len(b.shape(x)) == 4 else {"slots": k}))
    if len(b.shape(x)) == 4:  # a row per (token, slot) pair
        rows = b.retype(b.reshape(x, [[0, 1, 2], [3]], [None, i]), [None, i])
        ids = b.retype(b.reshape(experts, [[0, 1, 2]], [None]), [None])
        out = b.call(fn, [rows, ids, w], [b.tensor_type([None, o], dtype)])[0]
        return b.reshape(out, [[0, 1, 2], [3]], [n, s, k, o])
    rows = b.retype(b.reshape(x, [[0, 1], [2]], [None, i]), [None, i])  # shared by the slots
    ids = b.retype(b.reshape(experts, [[0, 1], [2]], [None, k]), [None, k])
    out = b.call(fn, [rows, ids, w], [b.tensor_type([None, k, o], dtype)])[0]
    return b.reshape(out, [[0, 1], [2], [3]], [n, s, k, o])


def _inline_expert_linear(b: Builder, x: Value, experts: Value, w: Value, *,
                          dtype: str) -> Value:
    """expert_linear's contraction written inline, for a weight or input whose element type
    is not dtype (the kernel takes x, w and its result in one type)."""
    n, s, k = b.dims(experts)
    o = b.shape(w)[1]
    per_slot = len(b.shape(x)) == 4
    # dims (b, s, k, o, i): i reduced
    spec = "bski,bsk->bsko" if per_slot else "bsi,bsk->bsko"

    dims = "".join(dict.fromkeys(spec.replace(",", "").replace("->", "")))
    o_at, i_at = dims.index("o"), dims.index("i")

    def body(xv, e, acc):
        row = [b.cast(e, "index"), b.linalg_index(o_at), b.linalg_index(i_at)]
        return b.addf(acc, b.mulf(b.cast(xv, "f32"), b.cast(b.extract(w, row), "f32")))

    acc = b.generic(spec, [x, experts], [b.filled([n, s, k, o], 0.0, "f32")], body)
    return b.map("bsko->bsko", [acc], dtype, lambda a: b.cast(a, dtype))


def quantized_expert_linear(b: Builder, x: Value, experts: Value, fmt: str,
                            fields: list[Value], *, dtype: str) -> Value:
    """As expert_linear for a kept-quantized stack (fields [E, O, I/block, ...]): the
    (token, slot) pairs as rows of the `{fmt}_expert_matmul` kernel, which dequantizes the
    picked expert's blocks inside its contraction (f32), cast to dtype."""
    n, s, k = b.dims(experts)
    e, o = b.shape(fields[0])[:2]
    i = b.shape(x)[-1]
    if len(b.shape(x)) == 3:  # one x for every slot: each (token, slot) pair gets a row
        x = b.generic("bsi->bski", [x], [b.empty([n, s, k, i], "f32")],
                      lambda v, _: b.cast(v, "f32"))
    else:
        x = b.map("bski->bski", [x], "f32", lambda v: b.cast(v, "f32"))
    rows = b.retype(b.reshape(x, [[0, 1, 2], [3]], [None, i]), [None, i])
    ids = b.retype(b.reshape(experts, [[0, 1, 2]], [None]), [None])
    fn = kernels.instantiate(b, f"{fmt}_expert_matmul", e=e, n=o, k=i)
    out = b.call(fn, [rows, ids, *fields], [b.tensor_type([None, o], "f32")])[0]
    out = b.map("po->po", [out], dtype, lambda v: b.cast(v, dtype))
    return b.reshape(out, [[0, 1, 2], [3]], [n, s, k, o])


def fp8_expert_linear(b: Builder, x: Value, experts: Value, qs: Value, d: Value,
                      rscale: Value, *, dtype: str) -> Value:
    """As expert_linear for fp8 experts: x quantized with rscale, the picked expert's fp8
    rows read inside the contraction (fp8 x fp8 products in f32), then acc * rscale *
    d[expert], cast to dtype."""
    n, s, k = b.dims(experts)
    o = b.shape(qs)[1]
    xq = fp8_quantize(b, x, rscale)
    spec = "bski,bsk->bsko" if len(b.shape(x)) == 4 else "bsi,bsk->bsko"
    dims = "".join(dict.fromkeys(spec.replace(",", "").replace("->", "")))

    def body(xv, e, acc):
        row = [b.cast(e, "index"), b.linalg_index(dims.index("o")),
               b.linalg_index(dims.index("i"))]
        return b.addf(acc, b.mulf(b.cast(xv, "f32"), b.cast(b.extract(qs, row), "f32")))

    acc = b.generic(spec, [xq, experts], [b.filled([n, s, k, o], 0.0, "f32")], body)

    def scaled(a, e, r):  # d[expert] (per-tensor) or d[expert, o] (per-channel)
        at = [b.cast(e, "index")] + ([b.linalg_index(3)] if len(b.shape(d)) == 2 else [])
        return b.cast(b.mulf(b.mulf(a, r), b.extract(d, at)), dtype)
    return b.map("bsko,bsk,->bsko", [acc, experts, rscale], dtype, scaled)


def _gelu_tanh(b: Builder, x: Value) -> Value:
    """GELU's tanh approximation (jax.nn.gelu's default, Grok-1's experts), f32:
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    c = b.scalar(math.sqrt(2.0 / math.pi), "f32")
    x3 = b.mulf(b.mulf(x, x), x)
    inner = b.mulf(c, b.addf(x, b.mulf(b.scalar(0.044715, "f32"), x3)))
    one = b.scalar(1.0, "f32")
    return b.mulf(b.mulf(b.scalar(0.5, "f32"), x), b.addf(one, b.tanh(inner)))


def _silu_mul(b: Builder, g: Value, u: Value, dtype: str, act: str = "silu") -> Value:
    """act(g) * u for one element, in f32, cast to dtype (as ops.ffn.silu_mul); act is
    silu or gelu_tanh (config.FFN_ACTIVATIONS)."""
    g32 = b.cast(g, "f32")
    if act == "gelu_tanh":
        a = _gelu_tanh(b, g32)
    else:
        a = b.divf(g32, b.addf(b.scalar(1.0, "f32"), b.exp(b.negf(g32))))
    return b.cast(b.mulf(a, b.cast(u, "f32")), dtype)


def silu_mul_slots(b: Builder, gate: Value, up: Value, *, dtype: str,
                   act: str = "silu") -> Value:
    """gate[N,S,K,F], up[N,S,K,F] -> act(gate) * up, in f32, cast to dtype."""
    return b.map("bskf,bskf->bskf", [gate, up], dtype,
                 lambda g, u: _silu_mul(b, g, u, dtype, act))


def combine(b: Builder, y: Value, weights: Value, *, dtype: str) -> Value:
    """y[N,S,K,D], weights[N,S,K] f32 -> sum over the K slots of weight * y [N,S,D]."""
    n, s, _, d = b.dims(y)
    acc = b.generic("bskd,bsk->bsd", [y, weights], [b.filled([n, s, d], 0.0, "f32")],
                    lambda v, wt, a: b.addf(a, b.mulf(b.cast(v, "f32"), wt)))
    return b.map("bsd->bsd", [acc], dtype, lambda a: b.cast(a, dtype))


def moe_ffn(b: Builder, x: Value, w_router: Value, w_gate: Value, w_up: Value,
            w_down: Value, *, k: int, renormalize: bool, dtype: str, act: str = "silu") -> Value:
    """x[N,S,D], w_router[E,D], w_gate/w_up[E,F,D], w_down[E,D,F] -> [N,S,D]: the sum over
    the token's k experts of weight * down(act(gate(x)) * up(x)) (act: silu, or Grok-1's
    gelu_tanh)."""
    weights, experts = route(b, x, w_router, k=k, renormalize=renormalize, dtype=dtype)
    gate = expert_linear(b, x, experts, w_gate, dtype=dtype)
    up = expert_linear(b, x, experts, w_up, dtype=dtype)
    h = silu_mul_slots(b, gate, up, dtype=dtype, act=act)
    return combine(b, expert_linear(b, h, experts, w_down, dtype=dtype), weights, dtype=dtype)


# ---- prefill: tokens grouped by expert -------------------------------------------------
def _rows_linear(b: Builder, x: Value, w: Experts, *, dtype: str) -> Value:
    """x[M,K], w[O,K] (or (format, fields [O, K/block, ...])) -> x @ w^T [M,O],
    accumulated in f32, cast to dtype; a quantized w runs the dense `{format}_matmul`."""
    m = b.dims(x)[0]
    if isinstance(w, tuple) and w[0] == "fp8":  # fp8: the expert's qs [O, I] and d [] or [O]
        qs, d, rscale = w[1]
        o, i = b.shape(qs)
        rows = b.retype(fp8_quantize(b, x, rscale), [None, i])
        kernel = "fp8_matmul_rows" if len(b.shape(d)) == 1 else "fp8_matmul"
        fn = kernels.instantiate(b, kernel, n=o, k=i, out_dtype=dtype)
        return b.call(fn, [rows, qs, rscale, d], [b.tensor_type([None, o], dtype)])[0]
    if isinstance(w, tuple):
        fmt, fields = w
        o, i = b.shape(fields[0])[0], b.shape(x)[1]
        rows = b.retype(b.map("mk->mk", [x], "f32", lambda v: b.cast(v, "f32")), [None, i])
        lanes = getattr(b, "quant_lanes", 0) if fmt in ("q8_0", "q4_1") else 0
        fn = kernels.instantiate(b, f"{fmt}_matmul", n=o, k=i,
                                 **({"lanes": lanes} if lanes else {}))
        acc = b.call(fn, [rows, *fields], [b.tensor_type([None, o], "f32")])[0]
        return b.map("mo->mo", [acc], dtype, lambda a: b.cast(a, dtype))
    acc = b.matmul_t(x, w, b.filled([m, b.shape(w)[0]], 0.0, "f32"))
    return b.map("mo->mo", [acc], dtype, lambda a: b.cast(a, dtype))


def _expert_slice(b: Builder, w: Experts, expert: Value) -> Experts:
    """Expert `expert` of a stack: w[expert], or each quantized field's slice."""
    if isinstance(w, tuple) and w[0] == "fp8":  # qs and d per expert; the input scale shared
        return w[0], [b.layer_slice(w[1][0], expert), b.layer_slice(w[1][1], expert), w[1][2]]
    if isinstance(w, tuple):
        return w[0], [b.layer_slice(f, expert) for f in w[1]]
    return b.layer_slice(w, expert)


def _n_experts(w: Experts, b: Builder) -> int:
    return b.shape(w[1][0] if isinstance(w, tuple) else w)[0]


def group_by_expert(b: Builder, experts: Value, n_experts: int) -> tuple[Value, ...]:
    """experts[N,S,K] i64 -> (perm[P], inv[P], counts[E], offsets[E]) over the P = N*S*K
    (token, slot) pairs (pair p = token * K + slot), ordered by expert and, within an
    expert, by pair: expert e's pairs are perm[offsets[e] : offsets[e] + counts[e]], and
    pair p sits at inv[p] (a counting sort: inv[p] = offsets[expert] + the pairs before p
    with the same expert; O(P^2) integer compares, small beside the experts' matmuls): the
    `moe_group` kernel."""
    flat = b.retype(b.reshape(experts, [[0, 1, 2]], [None]), [None])
    fn = kernels.instantiate(b, "moe_group", e=n_experts)
    return tuple(b.call(fn, [flat], [b.tensor_type([None], "i64")] * 2 +
                        [b.tensor_type([n_experts], "i64")] * 2))


def moe_ffn_grouped(b: Builder, x: Value, w_router: Value, w_gate: Value, w_up: Value,
                    w_down: Value, *, k: int, renormalize: bool, dtype: str,
                    act: str = "silu") -> Value:
    """As `moe_ffn`, with the (token, slot) pairs sorted by expert: each expert runs one
    matmul chain (gate, up, down) over the rows of the tokens that picked it, so each
    expert's weights are read once and the FLOPs are those of the K picked experts.
    The group sizes are read on the host to size the per-expert matmuls: all of them
    before the first expert runs, so the host waits once a layer (not once an expert)."""
    weights, experts = route(b, x, w_router, k=k, renormalize=renormalize, dtype=dtype)
    n_experts, d = _n_experts(w_gate, b), b.shape(x)[2]
    n, s, _ = b.dims(x)
    rows = b.reshape(x, [[0, 1], [2]], [None, d])
    perm, inv, counts, offsets = group_by_expert(b, experts, n_experts)
    pairs = b.dims(perm)[0]
    k_i64 = b.scalar(k, "i64")
    # The pairs' token rows in expert order: xs[q] = x[perm[q] // K].
    xs = b.generic("p->pd", [perm], [b.empty([pairs, d], dtype)], lambda p, _: b.extract(
        rows, [b.cast(b.divsi(p, k_i64), "index"), b.linalg_index(1)]))
    ys = b.filled([pairs, d], 0.0, dtype)
    # Every expert's slice bounds, read before any expert runs: one host read a layer.
    bounds = [[b.cast(b.extract(t, [b.index(e)]), "index") for t in (offsets, counts)]
              for e in range(n_experts)]
    for e, (off, cnt) in enumerate(bounds):
        xe = b.slice(xs, [off, 0], [cnt, d])
        expert = b.barrier(b.index(e))  # opaque: every expert reuses the same kernels
        wg, wu, wd = (_expert_slice(b, w, expert) for w in (w_gate, w_up, w_down))
        he = b.map("mf,mf->mf", [_rows_linear(b, xe, wg, dtype=dtype),
                                 _rows_linear(b, xe, wu, dtype=dtype)], dtype,
                   lambda g, u: _silu_mul(b, g, u, dtype, act))
        ys = b.insert(_rows_linear(b, he, wd, dtype=dtype), ys, [off, 0], [cnt, d])
    # Back to token order: slot j of token t is row inv[t*K + j] of ys.
    inv = b.reshape(inv, [[0, 1, 2]], [n, s, k])
    acc = b.generic("bsk,bsk->bsd", [weights, inv], [b.filled([n, s, d], 0.0, "f32")],
                    lambda wt, q, a: b.addf(a, b.mulf(b.cast(b.extract(
                        ys, [b.cast(q, "index"), b.linalg_index(3)]), "f32"), wt)))
    return b.map("bsd->bsd", [acc], dtype, lambda a: b.cast(a, dtype))


# ---- expert parallelism: whole experts per device --------------------------------------
def slot_weights(b: Builder, weights: Value, experts: Value, groups: int, local: int) -> Value:
    """weights[N,S,K] f32, experts[N,S,K] i64 -> r[N,S,G,L] f32: the router weight token
    (n, s) gave expert g*L + l (0 where it did not pick it)."""
    n, s, _ = b.dims(weights)

    def body(wt, e, acc):  # dims (b, s, k, g, l), k reduced
        mine = b.addi(b.muli(b.cast(b.linalg_index(3), "i64"), b.scalar(local, "i64")),
                      b.cast(b.linalg_index(4), "i64"))
        return b.addf(acc, b.select(b.cmpi("eq", e, mine), wt, b.scalar(0.0, "f32")))

    return b.generic("bsk,bsk->bsgl", [weights, experts],
                     [b.filled([n, s, groups, local], 0.0, "f32")], body)


def group_linear(b: Builder, x: Value, w: Value, *, dtype: str) -> Value:
    """x[N,S,I] (shared by every expert) or [N,S,G,L,I], w[G,L,O,I] -> [N,S,G,L,O]: each
    expert's x @ w^T, accumulated in f32, cast to dtype (a batched matmul over the experts:
    every expert's weights read once, whatever the number of tokens)."""
    g, l, o, _ = b.shape(w)
    n, s = b.dims(x)[:2]
    spec = "bsi,gloi->bsglo" if len(b.shape(x)) == 3 else "bsgli,gloi->bsglo"
    acc = b.generic(spec, [x, w], [b.filled([n, s, g, l, o], 0.0, "f32")],
                    lambda xv, wv, a: b.addf(a, b.mulf(b.cast(xv, "f32"), b.cast(wv, "f32"))))
    return b.map("bsglo->bsglo", [acc], dtype, lambda a: b.cast(a, dtype))


def moe_ffn_expert_groups(b: Builder, x: Value, w_router: Value, w_gate: Value, w_up: Value,
                          w_down: Value, *, k: int, renormalize: bool, dtype: str,
                          groups: int, act: str = "silu") -> Value:
    """As `moe_ffn`, with the E experts in `groups` groups of L = E/groups (expert
    parallelism: the sharding pass puts group g on device g, the stacked weights split along
    the expert dim). Every expert runs over every token, weighted by the router weight the
    token gave it (0 where it did not pick it): each expert's weights are read once, no
    expert's weights are read outside its group, and the weighted sum over the experts
    (g, l) leaves each device a partial sum that the block's all-reduce completes.
    FLOPs: T * E * 3 * 2 * D * F in all (E/k times the picked experts' work), E/groups
    experts' worth per device."""
    weights, experts = route(b, x, w_router, k=k, renormalize=renormalize, dtype=dtype)
    n_experts = b.shape(w_gate)[0]
    local = n_experts // groups
    # [E, O, I] -> [G, L, O, I]: the group is the dim that the pass splits over devices.
    wg, wu, wd = (b.reshape(w, [[0, 1], [2], [3]], [groups, local, *b.shape(w)[1:]])
                  for w in (w_gate, w_up, w_down))
    r = slot_weights(b, weights, experts, groups, local)
    h = b.map("bsglf,bsglf->bsglf", [group_linear(b, x, wg, dtype=dtype),
                                      group_linear(b, x, wu, dtype=dtype)], dtype,
              lambda g, u: _silu_mul(b, g, u, dtype, act))
    y = group_linear(b, h, wd, dtype=dtype)  # [N,S,G,L,D]
    n, s, _, _, d = b.dims(y)
    acc = b.generic("bsgld,bsgl->bsd", [y, r], [b.filled([n, s, d], 0.0, "f32")],
                    lambda v, wt, a: b.addf(a, b.mulf(b.cast(v, "f32"), wt)))
    return b.map("bsd->bsd", [acc], dtype, lambda a: b.cast(a, dtype))
