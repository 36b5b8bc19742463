"""iree_linalg_ext ops (attention, gather, scatter): no Python op classes exist for them,
so they are created generically. A mixin of `Builder`."""

from __future__ import annotations

from typing import Sequence

from iree.compiler import ir

from halo_mlir.toolchain import compat

Value = ir.Value


class LinalgExtOps:
    # Key layouts of `attention`: (iteration dims, k map, v map, mask map).
    _KEYS = {
        # k/v[B,H,T,D], mask[B,M,T]
        "flat": ("bhgmktn", "bhtk", "bhtn", "bmt"),
        # pages as gathered from the cache: k/v[B,P,H,S,D], key t = p * S + s, mask[B,M,P,S]
        "pages": ("bhgmkpsn", "bphsk", "bphsn", "bmps"),
        # blocked keys: k/v[B,H,J,U,D], key t = j * U + u, mask[B,M,U,J] (see
        # `ops.attention.attention_fused`: the order keeps IREE from merging J and U)
        "blocks": ("bhgmkjun", "bhjuk", "bhjun", "bmuj"),
    }

    def attention(self, q: Value, k: Value, v: Value, scale: Value, mask: Value,
                  out: Value, keys: str = "flat") -> Value:
        """iree_linalg_ext.attention, GQA form: q[B,H,G,M,D], k/v and mask in the `keys`
        layout (`_KEYS`; flat: k/v[B,H,T,D], mask[B,M,T]), i1 mask (true = keep), scale f32
        -> out[B,H,G,M,D]. Accumulates in f32."""
        dims, km, vm, mm = self._KEYS[keys]
        maps = self._affine_maps(dims, ["bhgmk", km, vm, "", mm, "bhgmn"])
        op = ir.Operation.create(
            "iree_linalg_ext.attention", results=[out.type],
            operands=[q, k, v, scale, mask, out], attributes={"indexing_maps": maps},
            regions=1)
        block = op.regions[0].blocks.append(self.type("f32"))
        with ir.InsertionPoint(block):
            ir.Operation.create("iree_linalg_ext.yield", operands=[block.arguments[0]])
        return op.results[0]

    def gather(self, source: Value, indices: Value, out: Value, dims: Sequence[int]) -> Value:
        """iree_linalg_ext.gather: out[batch..., slice...] = source[indices[batch..., :], slice...];
        `dims` are the source dims the last index dimension addresses (leading ones)."""
        attrs = {"dimension_map": ir.DenseI64ArrayAttr.get(list(dims))}
        if compat.current().gather_scatter_segments:
            attrs["operandSegmentSizes"] = ir.DenseI32ArrayAttr.get([2, 1])
        op = ir.Operation.create(
            "iree_linalg_ext.gather", results=[out.type], operands=[source, indices, out],
            attributes=attrs)
        return op.results[0]

    def scatter(self, updates: Value, indices: Value, original: Value, dims: Sequence[int]) -> Value:
        """iree_linalg_ext.scatter: original[indices[i, :], slice...] = updates[i, slice...];
        indices are unique (pages are never shared between rows)."""
        attrs = {"dimension_map": ir.DenseI64ArrayAttr.get(list(dims)),
                 "unique_indices": ir.BoolAttr.get(True)}
        if compat.current().gather_scatter_segments:
            attrs["operandSegmentSizes"] = ir.DenseI32ArrayAttr.get([2, 1])
        op = ir.Operation.create(
            "iree_linalg_ext.scatter", results=[original.type],
            operands=[updates, indices, original], attributes=attrs, regions=1)
        et = self.element_type(original)
        block = op.regions[0].blocks.append(et, et)
        with ir.InsertionPoint(block):
            ir.Operation.create("iree_linalg_ext.yield", operands=[block.arguments[0]])
        return op.results[0]
