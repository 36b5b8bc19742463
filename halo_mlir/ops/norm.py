"""RMSNorm, computed in f32."""

from halo_mlir.ir_builder import Builder, Value


def rmsnorm(b: Builder, x: Value, w: Value, *, eps: float, dtype: str) -> Value:
    """x[N,S,D], w[D] -> [N,S,D]: x * rsqrt(mean(x^2) + eps) * w, in f32, cast to dtype."""
    n, s, d = b.dims(x)

    def square_sum(xe, acc):
        x32 = b.cast(xe, "f32")
        return b.addf(acc, b.mulf(x32, x32))

    sumsq = b.generic("bsd->bs", [x], [b.filled([n, s], 0.0, "f32")], square_sum)
    inv_d = b.scalar(1.0 / d, "f32")
    eps_c = b.scalar(eps, "f32")

    def normalize(xe, ss, we, _):
        r = b.rsqrt(b.addf(b.mulf(ss, inv_d), eps_c))
        return b.cast(b.mulf(b.mulf(b.cast(xe, "f32"), r), b.cast(we, "f32")), dtype)

    return b.generic("bsd,bs,d->bsd", [x, sumsq, w], [b.empty([n, s, d], dtype)], normalize)
