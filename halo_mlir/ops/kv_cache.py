"""The paged KV cache (docs/ABI.md layout): page writes and page gathers.

`cache_state` is [P, page_elems]; viewed as 6-D it is [P, layer, k_or_v, kv_head, pos, d].
The layer index is a runtime scalar (`layer`, kept opaque by the caller) so that every
layer's scatter and gather are the same kernel.
"""

from __future__ import annotations

from halo_mlir.ir_builder import Builder, Value


def cache_view(b: Builder, cache: Value, *, layers: int, kv_heads: int, stride: int,
               head_dim: int) -> Value:
    """cache[P, page_elems] -> [P, layers, 2, kv_heads, stride, head_dim]."""
    p = b.dims(cache)[0]
    return b.reshape(cache, [[0], [1, 2, 3, 4, 5]], [p, layers, 2, kv_heads, stride, head_dim])


def cache_flat(b: Builder, cache6: Value) -> Value:
    """The inverse of `cache_view`."""
    shape = b.shape(cache6)
    elems = shape[1] * shape[2] * shape[3] * shape[4] * shape[5]
    return b.reshape(cache6, [[0], [1, 2, 3, 4, 5]], [None, elems])


def _page_indices(b: Builder, pages: Value, layer: Value, kv: int) -> Value:
    """pages[N,B] i64 -> [N,B,3] i64 rows (page, layer, kv)."""
    n, nb = b.dims(pages)
    kv_c = b.scalar(kv, "i64")

    def body(page, _):
        which = b.linalg_index(2)
        inner = b.select(b.cmpi("eq", which, b.index(1)), layer, kv_c)
        return b.select(b.cmpi("eq", which, b.index(0)), page, inner)

    return b.generic("bi->bic", [pages], [b.empty([n, nb, 3], "i64")], body)


def current_page(b: Builder, pages: Value, positions: Value, stride: int) -> Value:
    """[N,1] i64: the page holding position positions[n] of row n, pages[n, pos // stride]."""
    n = b.dims(positions)[0]
    stride_c = b.scalar(stride, "i64")

    def page_of(pos, _):
        return b.extract(pages, [b.linalg_index(0), b.cast(b.divsi(pos, stride_c), "index")])

    page = b.generic("b->b", [positions], [b.empty([n], "i64")], page_of)
    return b.reshape(page, [[0, 1]], [n, 1])


# ---- decode: the gather rows of every layer, computed once per step ---------------------
# A gather's rows (page, layer, k/v) depend on the layer, so computed inside the layer they
# are index-math dispatches of their own in every layer (IREE does not fuse an index
# producer into a gather or scatter). Computed once per step for all layers, a layer's rows
# are a contiguous slice of the table: a subview at the stream level, no dispatch.

def decode_tables(b: Builder, pages: Value, positions: Value, layers: int,
                  stride: int) -> tuple[Value, Value]:
    """pages[N,B], positions[N] -> (read rows [L,2,N,B,3]: (page, layer, k/v) of every
    page of each row, write rows [L,N,1,2]: (page, layer) of the page holding
    positions[n])."""
    n, nb = b.dims(pages)

    # Loop dims in order of appearance (Builder.generic): b, i, l, k, c.
    def read_row(page, _):
        which = b.linalg_index(4)
        layer = b.cast(b.linalg_index(2), "i64")
        kv = b.cast(b.linalg_index(3), "i64")
        inner = b.select(b.cmpi("eq", which, b.index(1)), layer, kv)
        return b.select(b.cmpi("eq", which, b.index(0)), page, inner)

    read = b.generic("bi->lkbic", [pages], [b.empty([layers, 2, n, nb, 3], "i64")], read_row)
    page = current_page(b, pages, positions, stride)  # [N,1]

    def write_row(pg, _):  # loop dims b, i, l, c
        layer = b.cast(b.linalg_index(2), "i64")
        return b.select(b.cmpi("eq", b.linalg_index(3), b.index(0)), pg, layer)

    write = b.generic("bi->lbic", [page], [b.empty([layers, n, 1, 2], "i64")], write_row)
    return read, write


def layer_rows(b: Builder, table: Value, layer: Value, kv: int | None = None) -> Value:
    """Layer `layer`'s rows of a `decode_tables` table (and its k or v half for the read
    table): [N,B,3] or [N,1,2]."""
    at = b.cast(layer, "index")
    if kv is None:
        return b.layer_slice(table, at)
    dims = b.dims(table)
    piece = b.slice(table, [at, kv, 0, 0, 0], [1, 1, *dims[2:]])
    return b.reshape(piece, [[0, 1, 2], [3], [4]], dims[2:])


def write_blocks(b: Builder, cache6: Value, k: Value, v: Value, pages: Value,
                 layer: Value) -> Value:
    """Prefill: k/v[N,KVH,S,D] (S = B*stride) into pages[N,B] of `layer`."""
    n, kvh, s, d = b.dims(k)
    stride = b.shape(cache6)[4]
    nb = b.dims(pages)[1]
    for kv, x in ((0, k), (1, v)):
        blocks = b.reshape(x, [[0], [1], [2, 3], [4]], [n, kvh, nb, stride, d])
        blocks = b.transpose(blocks, [0, 2, 1, 3, 4])  # [N,B,KVH,stride,D]
        blocks = b.reshape(blocks, [[0, 1], [2], [3], [4]], [None, kvh, stride, d])
        idx = b.reshape(_page_indices(b, pages, layer, kv), [[0, 1], [2]], [None, 3])
        cache6 = b.scatter(blocks, idx, cache6, [0, 1, 2])
    return cache6


def write_position(b: Builder, cache6: Value, k: Value, v: Value, idx: Value,
                   positions: Value) -> Value:
    """Decode: k/v[N,KVH,1,D] at positions[N], in the page of idx[N,1,2] (page, layer):
    the layer's write rows of `decode_tables`.

    One read-modify-write of each row's current page, K and V blocks of the layer together
    [2, KVH, stride, D]: the gather and scatter index only (page, layer), so the kv-head
    dim stays a slice dim (the sharding pass splits it) and one kernel serves every layer.
    """
    n, kvh, _, d = b.dims(k)
    stride = b.shape(cache6)[4]
    stride_c = b.scalar(stride, "i64")
    et = b.element_type(cache6)
    block = b.gather(cache6, idx, b.empty([n, 1, 2, kvh, stride, d], et), [0, 1])
    # No fusion barrier here: IREE compiles this gather fused with the merge (on CPU too,
    # unlike the former per-K/V blocks), and a barrier made the sharded bs 1 step fail to
    # schedule on gfx942 ("failed to schedule execution partitions without cyclic
    # dependencies").
    block = b.reshape(block, [[0, 1], [2], [3], [4], [5]], [n, 2, kvh, stride, d])

    def merge(old, new_k, new_v, pos, _):
        here = b.cmpi("eq", b.cast(b.linalg_index(3), "i64"), b.remsi(pos, stride_c))
        new = b.select(b.cmpi("eq", b.linalg_index(1), b.index(0)), new_k, new_v)
        return b.select(here, new, old)

    rows = [b.reshape(x, [[0], [1, 2], [3]], [n, kvh, d]) for x in (k, v)]
    block = b.generic("bkhsd,bhd,bhd,b->bkhsd", [block, *rows, positions],
                      [b.empty([n, 2, kvh, stride, d], et)], merge)
    return b.scatter(block, b.reshape(idx, [[0, 1], [2]], [n, 2]), cache6, [0, 1])


def read_pages(b: Builder, cache6: Value, rows: Value, separate: bool = True) -> Value:
    """Decode: the pages of gather rows[N,B,3] (`layer_rows`) -> k or v [N,KVH,B*stride,D]."""
    _, _, _, kvh, stride, d = b.shape(cache6)
    n, nb, _ = b.dims(rows)
    out = b.empty([n, nb, kvh, stride, d], b.element_type(cache6))
    blocks = b.gather(cache6, rows, out, [0, 1, 2])
    # Kept apart from the transpose: fused, IREE 3.9's CPU backend stages a tile of 64
    # gathered pages per row on the stack (256 KiB at bs 4: over its 32 KiB limit, and over
    # the runtime's worker stacks when the limit is raised). Not inside the layer loop
    # (`separate=False`): there, on several devices, IREE 3.13 fails on any barrier
    # between the two ("failed to solve for timepoint coverage" with
    # util.optimization_barrier, a partition "circular dependency" with flow.tensor.barrier).
    if separate:
        blocks = b.fusion_barrier(blocks)
    blocks = b.transpose(blocks, [0, 2, 1, 3, 4], [n, nb, kvh, stride, d])  # [N,KVH,B,stride,D]
    return b.reshape(blocks, [[0], [1], [2, 3], [4]], [n, kvh, None, d])


def read_blocks(b: Builder, cache6: Value, rows: Value) -> Value:
    """Decode: the pages of gather rows[N,B,3] (`layer_rows`) -> k or v as gathered,
    [N,B,KVH,stride,D] (key t = page * stride + slot). The fused attention reads this
    directly (`attention_fused`): with no transpose or reshape in between, IREE fuses the
    gather into the attention dispatch."""
    _, _, _, kvh, stride, d = b.shape(cache6)
    n, nb, _ = b.dims(rows)
    out = b.empty([n, nb, kvh, stride, d], b.element_type(cache6))
    return b.gather(cache6, rows, out, [0, 1, 2])


# ---- the layer loop (`--layer-loop`): the stack reads the cache, one write after it ----
# Carrying the cache through an `scf.for` leaves IREE 3.13 unable to see that the loop's
# result is the caller's buffer: it adds a whole-cache self-copy before the in-place alias
# (which the runtime rejects as overlapping). So inside the loop the cache is read-only;
# each layer's new K/V go into a small loop-carried accumulator, written to the pages once
# after the loop (a page holds every layer, so one scatter covers all of them).

def prefill_accumulator(b: Builder, cache6: Value, pages: Value) -> Value:
    """[N, B, layers, 2, KVH, stride, D]: the prompt's K/V, page-shaped, every layer."""
    _, layers, _, kvh, stride, d = b.shape(cache6)
    n, nb = b.dims(pages)
    return b.empty([n, nb, layers, 2, kvh, stride, d], b.element_type(cache6))


def prefill_accumulate(b: Builder, acc: Value, k: Value, v: Value, layer: Value) -> Value:
    """Layer `layer`'s k/v[N,KVH,S,D] into the accumulator."""
    n, nb, _, _, kvh, stride, d = b.dims(acc)
    at = b.cast(layer, "index")
    for kv, x in ((0, k), (1, v)):
        blocks = b.reshape(x, [[0], [1], [2, 3], [4]], [n, kvh, nb, stride, d])
        blocks = b.transpose(blocks, [0, 2, 1, 3, 4])  # [N,B,KVH,stride,D]
        blocks = b.reshape(blocks, [[0], [1], [2, 3, 4], [5], [6]], [n, nb, 1, 1, kvh, stride, d])
        acc = b.insert(blocks, acc, [0, 0, at, kv, 0, 0, 0], [n, nb, 1, 1, kvh, stride, d])
    return acc


def prefill_write(b: Builder, cache6: Value, acc: Value, pages: Value) -> Value:
    """Every layer's prompt K/V into pages[N,B] (whole pages)."""
    shape = b.shape(acc)
    blocks = b.reshape(acc, [[0, 1], [2], [3], [4], [5], [6]], [None, *shape[2:]])
    idx = b.reshape(pages, [[0, 1]], [None])
    idx = b.reshape(idx, [[0, 1]], [b.dims(idx)[0], 1])
    return b.scatter(blocks, idx, cache6, [0])


def decode_accumulator(b: Builder, cache6: Value, n: int) -> Value:
    """[N, layers, 2, KVH, D]: the new token's K/V, every layer."""
    _, layers, _, kvh, _, d = b.shape(cache6)
    return b.empty([n, layers, 2, kvh, d], b.element_type(cache6))


def decode_accumulate(b: Builder, acc: Value, k: Value, v: Value, layer: Value) -> Value:
    """Layer `layer`'s k/v[N,KVH,1,D] into the accumulator."""
    n, _, _, kvh, d = b.dims(acc)
    at = b.cast(layer, "index")
    for kv, x in ((0, k), (1, v)):
        rows = b.reshape(x, [[0], [1, 2], [3]], [n, kvh, d])  # drop S = 1
        rows = b.reshape(rows, [[0, 1, 2], [3], [4]], [n, 1, 1, kvh, d])  # add layer, k/v
        acc = b.insert(rows, acc, [0, at, kv, 0, 0], [n, 1, 1, kvh, d])
    return acc


def with_position(b: Builder, old: Value, new: Value, positions: Value) -> Value:
    """Gathered k or v [N,KVH,T,D] (or pages [N,B,KVH,stride,D], `read_blocks`) with position
    positions[n] replaced by new[N,KVH,1,D]: what attention would read after writing the
    token (the cache itself is written later)."""
    if len(b.shape(old)) == 5:
        return _with_position_blocks(b, old, new, positions)
    n, kvh, t, d = b.dims(old)
    rows = b.reshape(new, [[0], [1, 2], [3]], [n, kvh, d])

    def merge(o, x, pos, _):
        here = b.cmpi("eq", b.cast(b.linalg_index(2), "i64"), pos)
        return b.select(here, x, o)

    return b.generic("bhtd,bhd,b->bhtd", [old, rows, positions],
                     [b.empty([n, kvh, t, d], b.element_type(old))], merge)


def _with_position_blocks(b: Builder, old: Value, new: Value, positions: Value) -> Value:
    n, nb, kvh, stride, d = b.dims(old)
    rows = b.reshape(new, [[0], [1, 2], [3]], [n, kvh, d])
    stride_i = b.index(stride)

    def merge(o, x, pos, _):
        t = b.addi(b.muli(b.linalg_index(1), stride_i), b.linalg_index(3))
        return b.select(b.cmpi("eq", b.cast(t, "i64"), pos), x, o)

    return b.generic("bphsd,bhd,b->bphsd", [old, rows, positions],
                     [b.empty([n, nb, kvh, stride, d], b.element_type(old))], merge)


def decode_write(b: Builder, cache6: Value, acc: Value, pages: Value,
                 positions: Value) -> Value:
    """Every layer's new K/V into slot positions[n] % stride of page
    pages[n, positions[n] // stride]: read-modify-write of each row's page."""
    _, layers, _, kvh, stride, d = b.shape(cache6)
    n = b.dims(acc)[0]
    stride_c = b.scalar(stride, "i64")
    idx = current_page(b, pages, positions, stride)
    et = b.element_type(cache6)
    block = b.gather(cache6, idx, b.empty([n, layers, 2, kvh, stride, d], et), [0])
    block = b.fusion_barrier(block)  # see write_position

    def merge(old, new, pos, _):
        here = b.cmpi("eq", b.cast(b.linalg_index(4), "i64"), b.remsi(pos, stride_c))
        return b.select(here, new, old)

    block = b.generic("blchsd,blchd,b->blchsd", [block, acc, positions],
                      [b.empty([n, layers, 2, kvh, stride, d], et)], merge)
    return b.scatter(block, idx, cache6, [0])
