"""Grouped-query attention over a key/value sequence, with a causal + length mask.

Two forms with the same contract:
- `fused`: one `iree_linalg_ext.attention` op (GQA without repeating K/V);
- `decomposed`: matmul, f32 softmax, matmul, as plain linalg.generic ops.

Masking rule shared by prefill and decode: query (b, s) at position `qpos[b,s]` sees key t
iff `t <= qpos[b,s]` and `t < kv_len[b]`.
"""

from __future__ import annotations

import math

from halo_mlir.errors import HaloError
from halo_mlir.ir_builder import Builder, Value

# (qk, v): 0-d f32 tensors for fp8 operands. qk = q_rscale * k_rscale folds into the
# softmax scale, v = v_rscale multiplies the output: softmax((sq q)(sk k)^T / sqrt(D))(sv v)
# = sv softmax(sq sk q k^T / sqrt(D)) v.
Scales = tuple[Value, Value]


def check_operands(b: Builder, q: Value, k: Value, v: Value, scales: Scales | None) -> None:
    """Emit-time check: Q, K and V must share one element type (IREE rejects mixed ones
    late, as "qkv must have same data type"), and fp8 operands need their scales."""
    types = [str(b.element_type(x)) for x in (q, k, v)]
    if len(set(types)) > 1:
        raise HaloError(f"attention operands differ in element type (q {types[0]}, k "
                        f"{types[1]}, v {types[2]}); quantize Q, K and V alike (an fp8 KV "
                        "cache needs --dtype fp8)")
    if types[0].startswith("f8") and scales is None:
        raise HaloError(f"attention over {types[0]} operands needs their scales")


def _softmax_scale(b: Builder, q: Value, scales: Scales | None,
                   multiplier: float | None = None) -> Value:
    scale = b.scalar(1.0 / math.sqrt(b.shape(q)[4]) if multiplier is None else multiplier, "f32")
    if scales is None:
        return scale
    # A 0-d tensor: IREE hoists the read into an initializer (unrolled) or clones it into
    # the attention dispatch (layer loop); no host read per call either way.
    qk = b.extract(scales[0], [])
    return b.mulf(scale, qk)


def _keep(b: Builder, qpos: Value, kv_len: Value, t: Value) -> Value:
    t64 = b.cast(t, "i64")
    return b.andi(b.cmpi("sle", t64, qpos), b.cmpi("slt", t64, kv_len))


def attention_decomposed(b: Builder, q: Value, k: Value, v: Value, qpos: Value, kv_len: Value,
                         *, dtype: str, scales: Scales | None = None,
                         multiplier: float | None = None, softcap: float = 0.0) -> Value:
    """q[N,S,KVH,G,D], k/v[N,KVH,T,D], qpos[N,S] i64, kv_len[N] i64 -> [N,S,KVH,G,D].

    The logits q.k are multiplied by `multiplier` (None: 1/sqrt(D)); with `softcap` > 0
    they are then capped, `softcap * tanh(x / softcap)` (Grok-1), before the mask."""
    check_operands(b, q, k, v, scales)
    n, s, kvh, g, d = b.dims(q)
    t = b.dims(k)[2]
    scale = _softmax_scale(b, q, scales, multiplier)
    ninf = b.scalar(-math.inf, "f32")
    scores = b.generic("bskgd,bktd->bkgst", [q, k], [b.filled([n, kvh, g, s, t], 0.0, "f32")],
                       lambda qe, ke, acc: b.addf(acc, b.mulf(b.cast(qe, "f32"), b.cast(ke, "f32"))))

    def capped(x):
        if not softcap:
            return x
        cap = b.scalar(softcap, "f32")
        return b.mulf(cap, b.tanh(b.divf(x, cap)))

    def mask(sc, qp, kl, _):
        return b.select(_keep(b, qp, kl, b.linalg_index(4)), capped(b.mulf(sc, scale)), ninf)

    scores = b.generic("bkgst,bs,b->bkgst", [scores, qpos, kv_len],
                       [b.empty([n, kvh, g, s, t], "f32")], mask)
    row_max = b.generic("bkgst->bkgs", [scores], [b.filled([n, kvh, g, s], -math.inf, "f32")],
                        lambda x, acc: b.maxf(acc, x))
    probs = b.map("bkgst,bkgs->bkgst", [scores, row_max], "f32",
                  lambda x, m: b.exp(b.subf(x, m)))
    denom = b.generic("bkgst->bkgs", [probs], [b.filled([n, kvh, g, s], 0.0, "f32")],
                      lambda x, acc: b.addf(acc, x))
    out = b.generic("bkgst,bktd->bskgd", [probs, v], [b.filled([n, s, kvh, g, d], 0.0, "f32")],
                    lambda p, ve, acc: b.addf(acc, b.mulf(p, b.cast(ve, "f32"))))
    if scales is None:
        return b.map("bskgd,bkgs->bskgd", [out, denom], dtype,
                     lambda o, z: b.cast(b.divf(o, z), dtype))
    return b.map("bskgd,bkgs,->bskgd", [out, denom, scales[1]], dtype,
                 lambda o, z, sv: b.cast(b.mulf(b.divf(o, z), sv), dtype))


def attention_fused(b: Builder, q: Value, k: Value, v: Value, qpos: Value, kv_len: Value,
                    *, dtype: str, scales: Scales | None = None,
                    blocks: tuple[Value, int] | None = None) -> Value:
    """q[N,S,KVH,G,D], k/v[N,KVH,T,D] or gathered pages [N,B,KVH,stride,D], qpos[N,S] i64,
    kv_len[N] i64 -> [N,S,KVH,G,D].

    `blocks = (J, U)` when T = J * U (prefill: U the page stride, J the pages per row): the
    op then sees the keys as two dims, k/v[N,KVH,J,U,D] and mask[N,S,U,J]. The static inner
    key dim is what IREE's gfx942 attention config needs for MFMA at dynamic length; the
    mask's (U, J) order keeps IREE from collapsing the pair back into one dim (NOTES.md)."""
    if len(b.shape(k)) == 5:
        return _attention_fused_pages(b, q, k, v, qpos, kv_len, dtype=dtype, scales=scales)
    check_operands(b, q, k, v, scales)
    n, s, kvh, g, d = b.dims(q)
    if blocks is None:
        t = b.dims(k)[2]
        keep = b.generic("bs,b->bst", [qpos, kv_len], [b.empty([n, s, t], "i1")],
                         lambda qp, kl, _: _keep(b, qp, kl, b.linalg_index(2)))
        return _fused(b, q, k, v, keep, dtype, scales, "flat")
    j, u = blocks
    k, v = (b.reshape(x, [[0], [1], [2, 3], [4]], [n, kvh, j, u, d]) for x in (k, v))

    def key(qp, kl, _):  # t = j * U + u
        t = b.addi(b.muli(b.linalg_index(3), b.index(u)), b.linalg_index(2))
        return _keep(b, qp, kl, t)

    keep = b.generic("bs,b->bsuj", [qpos, kv_len], [b.empty([n, s, u, j], "i1")], key)
    return _fused(b, q, k, v, keep, dtype, scales, "blocks")


def _attention_fused_pages(b: Builder, q: Value, k: Value, v: Value, qpos: Value,
                           kv_len: Value, *, dtype: str, scales: Scales | None) -> Value:
    """k/v as gathered pages [N,B,KVH,stride,D] (`kv_cache.read_blocks`), key t = page *
    stride + slot: the attention op reads the gathered pages without a transpose or reshape
    in between, so IREE fuses the page gathers into its dispatch (on gfx942: the pages read
    in place with 128-bit loads)."""
    check_operands(b, q, k, v, scales)
    n, s, kvh, g, d = b.dims(q)
    nb, stride = b.dims(k)[1], b.shape(k)[3]
    if b.shape(k)[2] != kvh or b.shape(k)[4] != d:
        raise HaloError(f"attention: q {b.shape(q)} and paged k {b.shape(k)} disagree")
    stride_i = b.index(stride)

    def keep(qp, kl, _):
        t = b.addi(b.muli(b.linalg_index(2), stride_i), b.linalg_index(3))
        return _keep(b, qp, kl, t)

    mask = b.generic("bq,b->bqpt", [qpos, kv_len], [b.empty([n, s, nb, stride], "i1")], keep)
    if s != 1 or scales is not None:
        return _fused(b, q, k, v, mask, dtype, scales, "pages")
    # One query per row: q's query dim moved by reshapes, not a transpose, as in the
    # paged_decode_attention kernel (IREE then compiles both alike: equal bits on CPU).
    q4 = b.reshape(q, [[0], [1, 2], [3], [4]], [n, kvh, g, d])
    q5 = b.reshape(q4, [[0], [1], [2], [3, 4]], [n, kvh, g, 1, d])
    out = b.attention(q5, k, v, _softmax_scale(b, q, scales), mask,
                      b.empty([n, kvh, g, 1, d], dtype), keys="pages")
    out = b.reshape(out, [[0], [1], [2], [3, 4]], [n, kvh, g, d])
    return b.reshape(out, [[0], [1, 2], [3], [4]], [n, 1, kvh, g, d])


def _fused(b: Builder, q: Value, k: Value, v: Value, keep: Value, dtype: str,
           scales: Scales | None, keys: str) -> Value:
    n, s, kvh, g, d = b.dims(q)
    qt = b.transpose(q, [0, 2, 3, 1, 4])  # [N,KVH,G,S,D]
    scale = _softmax_scale(b, q, scales)
    if scales is None:
        out = b.attention(qt, k, v, scale, keep, b.empty([n, kvh, g, s, d], dtype), keys=keys)
    else:  # accumulate in f32, then v's scale and the cast
        out = b.attention(qt, k, v, scale, keep, b.empty([n, kvh, g, s, d], "f32"), keys=keys)
        out = b.map("bhgmd,->bhgmd", [out, scales[1]], dtype,
                    lambda o, sv: b.cast(b.mulf(o, sv), dtype))
    return b.transpose(out, [0, 3, 1, 2, 4])


ATTENTION = {"fused": attention_fused, "decomposed": attention_decomposed}
