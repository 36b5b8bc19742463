"""The only package that imports `iree.compiler.ir` and its dialects."""

from halo_mlir.ir_builder.builder import DYN, Builder, Dim, Value, is_empty_tensor, walk_nested

__all__ = ["Builder", "DYN", "Dim", "Value", "is_empty_tensor", "walk_nested"]
