"""FP8 (f8E4M3FNUZ) pieces of an `--dtype fp8` model: quantizing activations with their
static per-tensor scale and the FP8 linear (the `fp8_matmul` kernel). Scales are 0-d f32
tensors (parameters), so every multiply by a scale runs on the device."""

from __future__ import annotations

from halo_mlir import kernels
from halo_mlir.quantization.fp8 import FP8, FP8_MAX
from halo_mlir.ir_builder import Builder, Value


def quantize(b: Builder, x: Value, rscale: Value) -> Value:
    """x (any float type, any rank) -> f8E4M3FNUZ: x / rscale saturated to +-240 (fnuz has
    no infinity: an out-of-range value would become NaN), rounded to nearest even; the
    `+ 0.0` turns -0 into +0 (fnuz's only NaN is the negative-zero bit pattern)."""
    dims = "abcdefgh"[:len(b.shape(x))]
    hi, lo, zero = (b.scalar(v, "f32") for v in (FP8_MAX, -FP8_MAX, 0.0))

    def body(v, s):
        q = b.divf(b.cast(v, "f32"), s)
        q = b.addf(b.minf(b.maxf(q, lo), hi), zero)
        return b.cast(q, FP8)

    return b.map(f"{dims},->{dims}", [x, rscale], FP8, body)


def fp8_linear(b: Builder, x: Value, qs: Value, d: Value, in_rscale: Value, *,
               dtype: str) -> Value:
    """x[N,S,K] (dtype), weight qs[M,K] fp8 with scale d, input scale in_rscale -> [N,S,M]:
    x quantized with in_rscale, fp8 x fp8 matmul accumulated in f32, both scales applied
    after the contraction, cast to dtype. `d` is 0-d (per-tensor: `fp8_matmul`) or [M]
    (per-channel, one scale per weight row: `fp8_matmul_rows`)."""
    n, s, k = b.dims(x)
    m = b.shape(qs)[0]
    rows = b.reshape(quantize(b, x, in_rscale), [[0, 1], [2]], [None, b.shape(x)[2]])
    rows = b.retype(rows, [None, b.shape(x)[2]])
    kernel = "fp8_matmul_rows" if len(b.shape(d)) == 1 else "fp8_matmul"
    fn = kernels.instantiate(b, kernel, n=m, k=b.shape(qs)[1], out_dtype=dtype)
    out = b.call(fn, [rows, qs, in_rscale, d], [b.tensor_type([None, m], dtype)])[0]
    if isinstance(n, int) and isinstance(s, int):  # decode: the rows are static again
        out = b.retype(out, [n * s, m])
    return b.reshape(out, [[0, 1], [2]], [n, s, m])
