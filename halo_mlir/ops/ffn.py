"""SwiGLU feed-forward block."""

from halo_mlir.ir_builder import Builder, Value
from halo_mlir.ops.linear import linear, linear_pair


def silu_mul(b: Builder, gate: Value, up: Value, *, dtype: str) -> Value:
    """gate[N,S,F], up[N,S,F] -> silu(gate) * up, in f32, cast to dtype. gate and up may be
    f32 accumulators: they are rounded to dtype first, as the linears would."""
    one = b.scalar(1.0, "f32")

    def body(g, u):
        g32, u32 = (b.cast(b.cast(v, dtype), "f32") for v in (g, u))
        silu = b.divf(g32, b.addf(one, b.exp(b.negf(g32))))
        return b.cast(b.mulf(silu, u32), dtype)

    return b.map("bsf,bsf->bsf", [gate, up], dtype, body)


def ffn(b: Builder, x: Value, w_gate: Value, w_up: Value, w_down: Value, *, dtype: str) -> Value:
    """x[N,S,D] -> down(silu(gate(x)) * up(x)) [N,S,D]."""
    pair = linear_pair(b, x, w_gate, w_up)
    gate, up = pair or (linear(b, x, w, dtype=dtype) for w in (w_gate, w_up))
    return linear(b, silu_mul(b, gate, up, dtype=dtype), w_down, dtype=dtype)
