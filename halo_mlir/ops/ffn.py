"""SwiGLU feed-forward block."""

from halo_mlir.ir_builder import Builder, Value
from halo_mlir.ops.linear import linear


def silu_mul(b: Builder, gate: Value, up: Value, *, dtype: str) -> Value:
    """gate[N,S,F], up[N,S,F] -> silu(gate) * up, in f32, cast to dtype."""
    one = b.scalar(1.0, "f32")

    def body(g, u):
        g32 = b.cast(g, "f32")
        silu = b.divf(g32, b.addf(one, b.exp(b.negf(g32))))
        return b.cast(b.mulf(silu, b.cast(u, "f32")), dtype)

    return b.map("bsf,bsf->bsf", [gate, up], dtype, body)


def ffn(b: Builder, x: Value, w_gate: Value, w_up: Value, w_down: Value, *, dtype: str) -> Value:
    """x[N,S,D] -> down(silu(gate(x)) * up(x)) [N,S,D]."""
    h = silu_mul(b, linear(b, x, w_gate, dtype=dtype), linear(b, x, w_up, dtype=dtype),
                 dtype=dtype)
    return linear(b, h, w_down, dtype=dtype)
