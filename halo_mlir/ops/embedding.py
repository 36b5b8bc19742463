"""Token embedding lookup."""

from halo_mlir.ir_builder import Builder, Value


def embedding(b: Builder, table: Value, tokens: Value) -> Value:
    """table[V,D], tokens[N,S] i64 -> [N,S,D] (rows of table)."""
    n, s = b.dims(tokens)
    d = b.shape(table)[1]

    def body(tok, _):
        return b.extract(table, [b.cast(tok, "index"), b.linalg_index(2)])

    return b.generic("bs->bsd", [tokens], [b.empty([n, s, d], b.element_type(table))], body)
