"""Rotary position embedding (half-split `rotate_half` convention, HF order)."""

from __future__ import annotations

from halo_mlir.ir_builder import Builder, Value


def rope_table(b: Builder, positions: Value, freqs: Value) -> tuple[Value, Value]:
    """positions[N,S] i64, freqs[D/2] f32 -> (cos, sin) [N,S,D/2] f32 of the angles p*f:
    computed once per call of the program, read by every layer."""
    n, s = b.dims(positions)
    half = b.shape(freqs)[0]

    def trig(fn):
        def body(pos, f, _):
            return fn(b.mulf(b.cast(pos, "f32"), f))
        return b.generic("bs,j->bsj", [positions, freqs], [b.empty([n, s, half], "f32")], body)
    return trig(b.cos), trig(b.sin)


def rope(b: Builder, x: Value, cos: Value, sin: Value, *, dtype: str) -> Value:
    """x[N,S,H,D], cos/sin[N,S,D/2] f32 (`rope_table`) -> [N,S,H,D].

    out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1), in f32.
    """
    n, s, h, d = b.dims(x)
    half = d // 2
    pairs = b.reshape(x, [[0], [1], [2], [3, 4]], [n, s, h, 2, half])

    # The halves x1, x2 are read through maps with a constant pair index, not sliced out of
    # x (slices of a matmul result become copy dispatches of their own).
    def body(xe, x1e, x2e, c, sn, _):
        first = b.cmpi("eq", b.linalg_index(3), b.index(0))
        rotated = b.select(first, b.negf(b.cast(x2e, "f32")), b.cast(x1e, "f32"))
        return b.cast(b.addf(b.mulf(b.cast(xe, "f32"), c), b.mulf(rotated, sn)), dtype)

    out = b.generic("bshkj,bshkj,bshkj,bsj,bsj->bshkj", [pairs, pairs, pairs, cos, sin],
                    [b.empty([n, s, h, 2, half], dtype)], body, fixed={1: {3: 0}, 2: {3: 1}})
    return b.reshape(out, [[0], [1], [2], [3, 4]], [n, s, h, d])
