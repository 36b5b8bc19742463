"""Builds IR from Python values: types, the einsum-style `Builder`, globals bound to
parameters, `iree_linalg_ext` ops and the entry points. Every op the emitter makes goes
through here; the passes (sharding_passes/) and readers (analysis/, api.py) use
`iree.compiler.ir` directly to walk and rewrite the modules it built."""

from halo_mlir.ir_builder.builder import DYN, Builder, Dim, Value, is_empty_tensor, walk_nested

__all__ = ["Builder", "DYN", "Dim", "Value", "is_empty_tensor", "walk_nested"]
