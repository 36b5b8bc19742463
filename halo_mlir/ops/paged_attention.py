"""Attention straight from the paged KV cache (`--attention paged`): the templated kernels
`paged_prefill_attention` (writes the prompt's pages, then attends) and
`paged_decode_attention` (gathers the row's pages, masks by seq_lens), called once per layer
with an opaque layer index, so every layer shares one instantiation.
"""

from __future__ import annotations

from halo_mlir import kernels
from halo_mlir.errors import HaloError
from halo_mlir.ir_builder import Builder, Value


def _params(b: Builder, q: Value, cache6: Value, dtype: str) -> dict:
    _, layers, _, kvh, stride, d = b.shape(cache6)
    return dict(dtype=dtype, batch=b.shape(q)[0], kv_heads=kvh, group=b.shape(q)[-2],
                head_dim=d, stride=stride, layers=layers)


def _instantiate(b: Builder, name: str, values: dict) -> str:
    try:
        return kernels.instantiate(b, name, **values)
    except HaloError as e:
        raise HaloError(f"--attention paged: {e} (emit with --attention fused for this "
                        "model)") from None


def paged_prefill(b: Builder, q: Value, k: Value, v: Value, seq_lens: Value, cache6: Value,
                  pages: Value, layer: Value, *, dtype: str) -> tuple[Value, Value]:
    """q[N,S,KVH,G,D], k/v[N,KVH,S,D], seq_lens[N], cache6, pages[N,S/stride], layer i64
    -> (out [N,S,KVH,G,D], cache6 with the K/V written)."""
    values = _params(b, q, cache6, dtype)
    fn = _instantiate(b, "paged_prefill_attention", values)
    n, _, kvh, g, d = b.shape(q)
    args = [b.retype(q, [n, None, kvh, g, d]), b.retype(k, [n, kvh, None, d]),
            b.retype(v, [n, kvh, None, d]), seq_lens, b.retype(cache6, [None, *b.shape(cache6)[1:]]),
            b.retype(pages, [n, None]), layer]
    out, cache = b.call(fn, args, [args[0].type, args[4].type])
    return b.retype(out, b.shape(q)), b.retype(cache, b.shape(cache6))


def paged_decode(b: Builder, q: Value, cache6: Value, k_rows: Value, v_rows: Value,
                 seq_lens: Value, *, dtype: str) -> Value:
    """q[N,1,KVH,G,D] over the pages of the gather rows k_rows/v_rows[N,B,3] (page, layer,
    k/v; written already), keys t < seq_lens[n] -> [N,1,KVH,G,D]."""
    values = _params(b, q, cache6, dtype)
    fn = _instantiate(b, "paged_decode_attention", values)
    n, _, kvh, g, d = b.shape(q)
    q4 = b.reshape(q, [[0], [1, 2], [3], [4]], [n, kvh, g, d])
    args = [q4, b.retype(cache6, [None, *b.shape(cache6)[1:]]),
            *(b.retype(r, [n, None, 3]) for r in (k_rows, v_rows)), seq_lens]
    out = b.call(fn, args, [q4.type])[0]
    return b.reshape(out, [[0], [1, 2], [3], [4]], [n, 1, kvh, g, d])
