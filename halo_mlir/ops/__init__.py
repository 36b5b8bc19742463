"""Llama building blocks. Each op is `(b, *values, **static) -> value`, emitting
linalg/tensor/arith/iree_linalg_ext ops through `halo_mlir.ir_builder.Builder`."""
