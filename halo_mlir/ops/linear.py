"""Linear layers: x @ W^T with f32 accumulation, and elementwise helpers around them."""

from halo_mlir.ir_builder import Builder, Value


def linear(b: Builder, x: Value, w: Value, *, dtype: str) -> Value:
    """x[N,S,K], w[M,K] -> [N,S,M]: x @ w^T accumulated in f32, cast to dtype."""
    n, s, _ = b.dims(x)
    m = b.shape(w)[0]
    rows = b.reshape(x, [[0, 1], [2]], [None, b.shape(x)[2]])
    acc = b.matmul_t(rows, w, b.filled([b.dims(rows)[0], m], 0.0, "f32"))
    out = b.generic("mn->mn", [acc], [b.empty(b.dims(acc), dtype)],
                    lambda a, _: b.cast(a, dtype))
    return b.reshape(out, [[0, 1], [2]], [n, s, m])


def linear_pair(b: Builder, x: Value, w1: Value, w2: Value) -> tuple[Value, Value] | None:
    """x[N,S,K], w1/w2[M,K] -> (x @ w1^T, x @ w2^T) [N,S,M] in f32, as one contraction with
    two accumulators (one kernel reads x once and both weights); None when N*S is dynamic
    (prefill: two matmuls, which get MFMA)."""
    n, s, k = b.dims(x)
    if not (isinstance(n, int) and isinstance(s, int)):
        return None
    m = b.shape(w1)[0]
    rows = b.reshape(x, [[0, 1], [2]], [n * s, k])

    def body(xe, a, c, acc_a, acc_c):
        x32 = b.cast(xe, "f32")
        return [b.addf(acc_a, b.mulf(x32, b.cast(a, "f32"))),
                b.addf(acc_c, b.mulf(x32, b.cast(c, "f32")))]
    accs = b.generic("rk,mk,mk->rm,rm", [rows, w1, w2],
                     [b.filled([n * s, m], 0.0, "f32") for _ in range(2)], body)
    return tuple(b.reshape(a, [[0, 1], [2]], [n, s, m]) for a in accs)


def add(b: Builder, x: Value, y: Value) -> Value:
    """x[N,S,D] + y[N,S,D] (the residual connection)."""
    return b.map("bsd,bsd->bsd", [x, y], b.element_type(x), b.addf)
