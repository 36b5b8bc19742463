"""Linear layers and embedding lookups on block-quantized weights (templated kernels)."""

from __future__ import annotations

from halo_mlir import kernels
from halo_mlir.ir_builder import Builder, Value


def quantized_linear(b: Builder, x: Value, fmt: str, fields: list[Value], n: int, *,
                     dtype: str) -> Value:
    """x[N,S,K], w[n,K] in block format `fmt` (fields as in halo_mlir.quant) -> [N,S,n]:
    dequantize-in-matmul with f32 accumulation (kernel `{fmt}_matmul`), cast to dtype."""
    nb, s, k = b.dims(x)
    rows = b.reshape(x, [[0, 1], [2]], [None, k])
    rows = b.retype(b.map("mk->mk", [rows], "f32", lambda v: b.cast(v, "f32")), [None, k])
    lanes = getattr(b, "quant_lanes", 0) if fmt in ("q8_0", "q4_1") else 0
    fn = kernels.instantiate(b, f"{fmt}_matmul", n=n, k=k, **({"lanes": lanes} if lanes else {}))
    out = b.call(fn, [rows, *fields], [b.tensor_type([None, n], "f32")])[0]
    out = b.map("mn->mn", [out], dtype, lambda v: b.cast(v, dtype))
    return b.reshape(out, [[0, 1], [2]], [nb, s, n])


def quantized_embedding(b: Builder, fmt: str, fields: list[Value], tokens: Value, vocab: int,
                        dim: int, *, dtype: str) -> Value:
    """tokens[N,S] i64, table[vocab,dim] in block format `fmt` -> rows [N,S,dim] in dtype."""
    nb, s = b.dims(tokens)
    ids = b.retype(b.reshape(tokens, [[0, 1]], [None]), [None])
    fn = kernels.instantiate(b, f"{fmt}_rows", n=vocab, k=dim)
    rows = b.call(fn, [ids, *fields], [b.tensor_type([None, dim], "f32")])[0]
    rows = b.map("tk->tk", [rows], dtype, lambda v: b.cast(v, dtype))
    return b.reshape(rows, [[0, 1], [2]], [nb, s, dim])
