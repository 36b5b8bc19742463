"""FP8 (f8E4M3FNUZ) pieces of an `--dtype fp8` model: quantizing activations with their
static per-tensor scale, or each row with its own (dynamic per-token scales), and the FP8
linear (the `fp8_matmul*` kernels). Static scales are 0-d f32 tensors (parameters), so every
multiply by a scale runs on the device."""

from __future__ import annotations

import numpy as np

from halo_mlir import kernels
from halo_mlir.quantization.fp8 import FN_MAX_IN_FNUZ, FP8, FP8_MAX
from halo_mlir.ir_builder import Builder, Value

# Dynamic per-token scales put a row's amax at 224, not at fnuz's 240: 224 is e4m3fn's 448
# in fnuz (the same bits mean half the value), so a row quantizes to the grid a published
# e4m3fn checkpoint's scheme (amax / 448) gives, bit for bit, and runs the same numbers on
# either format.
TOKEN_MAX = FN_MAX_IN_FNUZ
# A row of zeros: any positive scale quantizes it to zeros; this one keeps 1 / scale finite.
TOKEN_MIN_AMAX = 1e-12
# Marks a reduction whose result each device keeps for itself under --tp (a row's amax over
# the device's own columns): the sharding pass neither sums nor gathers it.
PER_DEVICE = "halo.per_device"


def quantize(b: Builder, x: Value, rscale: Value, top: float = FP8_MAX) -> Value:
    """x (any float type, any rank) -> f8E4M3FNUZ: x / rscale saturated to +-top (240, fnuz's
    largest: it has no infinity, an out-of-range value would become NaN; 224 for a published
    e4m3fn checkpoint's scales, whose inputs saturate at e4m3fn's 448), rounded to nearest
    even; the `+ 0.0` turns -0 into +0 (fnuz's only NaN is the negative-zero bit pattern)."""
    dims = "abcdefgh"[:len(b.shape(x))]
    hi, lo, zero = (b.scalar(v, "f32") for v in (top, -top, 0.0))

    def body(v, s):
        q = b.divf(b.cast(v, "f32"), s)
        q = b.addf(b.minf(b.maxf(q, lo), hi), zero)
        return b.cast(q, FP8)

    return b.map(f"{dims},->{dims}", [x, rscale], FP8, body)


def fp8_linear(b: Builder, x: Value, qs: Value, d: Value, in_rscale: Value, *,
               dtype: str, top: float = FP8_MAX) -> Value:
    """x[N,S,K] (dtype), weight qs[M,K] fp8 with scale d, input scale in_rscale -> [N,S,M]:
    x quantized with in_rscale (saturated at +-top), fp8 x fp8 matmul accumulated in f32,
    both scales applied after the contraction, cast to dtype. `d` is 0-d (per-tensor: `fp8_matmul`) or [M]
    (per-channel, one scale per weight row: `fp8_matmul_rows`)."""
    n, s, k = b.dims(x)
    m = b.shape(qs)[0]
    rows = b.reshape(quantize(b, x, in_rscale, top), [[0, 1], [2]], [None, b.shape(x)[2]])
    rows = b.retype(rows, [None, b.shape(x)[2]])
    kernel = "fp8_matmul_rows" if len(b.shape(d)) == 1 else "fp8_matmul"
    fn = kernels.instantiate(b, kernel, n=m, k=b.shape(qs)[1], out_dtype=dtype)
    out = b.call(fn, [rows, qs, in_rscale, d], [b.tensor_type([None, m], dtype)])[0]
    if isinstance(n, int) and isinstance(s, int):  # decode: the rows are static again
        out = b.retype(out, [n * s, m])
    return b.reshape(out, [[0, 1], [2]], [n, s, m])


def quantize_tokens(b: Builder, rows: Value, ub: float | None = None) -> tuple[Value, Value]:
    """rows[M,K] (any float type) -> (q[M,K] f8E4M3FNUZ, amax[M] f32): each row divided by
    its own scale min(max(amax, TOKEN_MIN_AMAX), ub) / TOKEN_MAX (`ub`: an upper bound on
    the amax, fbgemm's activation_scale_ub; None: none), saturated to +-TOKEN_MAX and
    rounded to nearest even. The scale is computed where it is used (here and in
    `fp8_matmul_tokens`'s epilogue) from the amax: as an op of its own, shared by Q, K and V,
    IREE 3.13 placed every device's copy on device 0 under --tp.
    Under --tp with the columns split (a row-parallel linear's input) each device scales its
    own columns with their own amax (PER_DEVICE): the matmul's partial sums carry each
    device's scale into the sum, so the result is exactly that of the per-device grids."""
    m, k = b.dims(rows)
    zero = b.scalar(0.0, "f32")

    def row_amax(x, acc):
        return b.maxf(acc, b.absf(b.cast(x, "f32")))

    amax = b.tag(b.generic("mk->m", [rows], [b.filled([m], 0.0, "f32")], row_amax), PER_DEVICE)
    lo_amax, top = b.scalar(TOKEN_MIN_AMAX, "f32"), b.scalar(TOKEN_MAX, "f32")
    ub_c = b.scalar(ub, "f32") if ub is not None else None

    def scale_of(a):
        a = b.maxf(a, lo_amax)
        return b.divf(b.minf(a, ub_c) if ub_c is not None else a, top)

    hi, lo = b.scalar(TOKEN_MAX, "f32"), b.scalar(-TOKEN_MAX, "f32")

    def body(v, a):
        q = b.divf(b.cast(v, "f32"), scale_of(a))
        q = b.addf(b.minf(b.maxf(q, lo), hi), zero)
        return b.cast(q, FP8)

    return b.map("mk,m->mk", [rows, amax], FP8, body), amax


def fp8_linear_tokens(b: Builder, x: Value, qs: Value, d: Value, *, dtype: str,
                      ub: float | None = None) -> Value:
    """x[N,S,K] (dtype), weight qs[M,K] fp8 with scale d (0-d, or [M] per channel) ->
    [N,S,M]: each token quantized with its own scale (quantize_tokens), fp8 x fp8 matmul
    accumulated in f32, the token's and the weight's scales applied after the contraction
    (`fp8_matmul_tokens`), cast to dtype."""
    n, s, k = b.dims(x)
    m = b.shape(qs)[0]
    # Q, K and V (gate and up) read the same x: its tokens are quantized once.
    memo = b.__dict__.setdefault("fp8_token_rows", {})
    if (x, ub) not in memo:
        rows = b.retype(b.reshape(x, [[0, 1], [2]], [None, b.shape(x)[2]]),
                        [None, b.shape(x)[2]])
        memo[(x, ub)] = quantize_tokens(b, rows, ub)
    q, amax = memo[(x, ub)]
    fn = kernels.instantiate(b, "fp8_matmul_tokens", n=m, k=b.shape(qs)[1], out_dtype=dtype,
                             w_scales="rows" if len(b.shape(d)) == 1 else "tensor")
    bound = b.dense(np.array(np.inf if ub is None else ub, np.float32), "f32")
    out = b.call(fn, [q, amax, bound, qs, d], [b.tensor_type([None, m], dtype)])[0]
    if isinstance(n, int) and isinstance(s, int):  # decode: the rows are static again
        out = b.retype(out, [n * s, m])
    return b.reshape(out, [[0, 1], [2]], [n, s, m])
