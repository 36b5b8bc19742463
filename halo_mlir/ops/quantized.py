"""Linear layers and embedding lookups on block-quantized weights (templated kernels)."""

from __future__ import annotations

from halo_mlir import kernels
from halo_mlir.ir_builder import Builder, Value
from halo_mlir.kernels.quantized import BLOCKS_FORMATS


def quantized_linear(b: Builder, x: Value, fmt: str, fields: list[Value], n: int, *,
                     dtype: str) -> Value:
    """x[N,S,K], w[n,K] in block format `fmt` (fields as in halo_mlir.quantization.blocks) -> [N,S,n]:
    dequantize-in-matmul with f32 accumulation (kernel `{fmt}_matmul`, or on the CPU
    `{fmt}_matmul_blocks` for one row per sequence and a separate dequantization and plain
    matmul for more: docs/cpu-quantized.md), cast to dtype."""
    nb, s, k = b.dims(x)
    rows = b.reshape(x, [[0, 1], [2]], [None, k])
    rows = b.retype(b.map("mk->mk", [rows], "f32", lambda v: b.cast(v, "f32")), [None, k])
    if s != 1 and getattr(b, "quant_prefill_dequant", False):
        out = _dequantized_matmul(b, rows, fmt, fields, n, k)
        out = b.map("mn->mn", [out], dtype, lambda v: b.cast(v, dtype))
        return b.reshape(out, [[0, 1], [2]], [nb, s, n])
    lanes = getattr(b, "quant_lanes", 0) if fmt in ("q8_0", "q4_1") else 0
    if getattr(b, "quant_blocks", False) and fmt in BLOCKS_FORMATS:
        fn = kernels.instantiate(b, f"{fmt}_matmul_blocks", n=n, k=k)
    else:
        fn = kernels.instantiate(b, f"{fmt}_matmul", n=n, k=k,
                                 **({"lanes": lanes} if lanes else {}))
    out = b.call(fn, [rows, *fields], [b.tensor_type([None, n], "f32")])[0]
    out = b.map("mn->mn", [out], dtype, lambda v: b.cast(v, dtype))
    return b.reshape(out, [[0, 1], [2]], [nb, s, n])


def _dequantized_matmul(b: Builder, rows: Value, fmt: str, fields: list[Value], n: int,
                        k: int) -> Value:
    """rows[M,K] f32 @ dequant(w)[n,K]^T -> [M,n] f32: the weight dequantized to f32 by
    `{fmt}_dequant` in a dispatch of its own, then a plain matmul, which IREE's CPU codegen
    tiles as a matmul (at M = 32 rows many times faster than the dequantize-in-matmul
    reduction). The fields pass an optimization barrier so IREE does not hoist the
    dequantization of the constant weight into the program's initializer (which would keep
    an f32 copy of every weight); in a layer loop a block's weight is a slice of a stacked
    weight at the loop index, no constant, and takes no barrier (one in the loop body fails
    IREE's stream scheduling: "failed to solve for timepoint coverage")."""
    loop_body = getattr(b, "layer_loop", False)
    fields = [f if loop_body and _is_argument(f) else b.barrier(f) for f in fields]
    fn = kernels.instantiate(b, f"{fmt}_dequant", n=n, k=k)
    w = b.call(fn, fields, [b.tensor_type([n, k], "f32")])[0]
    return b.matmul_t(rows, w, b.filled([b.dims(rows)[0], n], 0.0, "f32"))


def _is_argument(v: Value) -> bool:
    """`v` is a block argument (a decoder block's weight; in a layer loop, a slice)."""
    return getattr(v.owner, "operation", None) is None


def quantized_embedding(b: Builder, fmt: str, fields: list[Value], tokens: Value, vocab: int,
                        dim: int, *, dtype: str) -> Value:
    """tokens[N,S] i64, table[vocab,dim] in block format `fmt` -> rows [N,S,dim] in dtype."""
    nb, s = b.dims(tokens)
    ids = b.retype(b.reshape(tokens, [[0, 1]], [None]), [None])
    fn = kernels.instantiate(b, f"{fmt}_rows", n=vocab, k=dim)
    rows = b.call(fn, [ids, *fields], [b.tensor_type([None, dim], "f32")])[0]
    rows = b.map("tk->tk", [rows], dtype, lambda v: b.cast(v, dtype))
    return b.reshape(rows, [[0, 1], [2]], [nb, s, dim])
