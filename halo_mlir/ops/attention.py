"""Grouped-query attention over a key/value sequence, with a causal + length mask.

Two forms with the same contract:
- `fused`: one `iree_linalg_ext.attention` op (GQA without repeating K/V);
- `decomposed`: matmul, f32 softmax, matmul, as plain linalg.generic ops.

Masking rule shared by prefill and decode: query (b, s) at position `qpos[b,s]` sees key t
iff `t <= qpos[b,s]` and `t < kv_len[b]`.
"""

from __future__ import annotations

import math

from halo_mlir.ir_builder import Builder, Value


def _keep(b: Builder, qpos: Value, kv_len: Value, t: Value) -> Value:
    t64 = b.cast(t, "i64")
    return b.andi(b.cmpi("sle", t64, qpos), b.cmpi("slt", t64, kv_len))


def attention_decomposed(b: Builder, q: Value, k: Value, v: Value, qpos: Value, kv_len: Value,
                         *, dtype: str) -> Value:
    """q[N,S,KVH,G,D], k/v[N,KVH,T,D], qpos[N,S] i64, kv_len[N] i64 -> [N,S,KVH,G,D]."""
    n, s, kvh, g, d = b.dims(q)
    t = b.dims(k)[2]
    scale = b.scalar(1.0 / math.sqrt(b.shape(q)[4]), "f32")
    ninf = b.scalar(-math.inf, "f32")
    scores = b.generic("bskgd,bktd->bkgst", [q, k], [b.filled([n, kvh, g, s, t], 0.0, "f32")],
                       lambda qe, ke, acc: b.addf(acc, b.mulf(b.cast(qe, "f32"), b.cast(ke, "f32"))))

    def mask(sc, qp, kl, _):
        return b.select(_keep(b, qp, kl, b.linalg_index(4)), b.mulf(sc, scale), ninf)

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
    return b.map("bskgd,bkgs->bskgd", [out, denom], dtype,
                 lambda o, z: b.cast(b.divf(o, z), dtype))


def attention_fused(b: Builder, q: Value, k: Value, v: Value, qpos: Value, kv_len: Value,
                    *, dtype: str) -> Value:
    """q[N,S,KVH,G,D], k/v[N,KVH,T,D], qpos[N,S] i64, kv_len[N] i64 -> [N,S,KVH,G,D]."""
    n, s, kvh, g, d = b.dims(q)
    t = b.dims(k)[2]
    keep = b.generic("bs,b->bst", [qpos, kv_len], [b.empty([n, s, t], "i1")],
                     lambda qp, kl, _: _keep(b, qp, kl, b.linalg_index(2)))
    qt = b.transpose(q, [0, 2, 3, 1, 4])  # [N,KVH,G,S,D]
    scale = b.scalar(1.0 / math.sqrt(b.shape(q)[4]), "f32")
    out = b.attention(qt, k, v, scale, keep, b.empty([n, kvh, g, s, d], dtype))
    return b.transpose(out, [0, 3, 1, 2, 4])


ATTENTION = {"fused": attention_fused, "decomposed": attention_decomposed}
