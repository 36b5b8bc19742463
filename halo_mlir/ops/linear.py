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


def add(b: Builder, x: Value, y: Value) -> Value:
    """x[N,S,D] + y[N,S,D] (the residual connection)."""
    return b.map("bsd,bsd->bsd", [x, y], b.element_type(x), b.addf)
