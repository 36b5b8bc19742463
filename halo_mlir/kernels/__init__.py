"""Python side of the jinja2-templated MLIR kernels in `halo_mlir/templates/`: parameter
checks, name mangling, instantiation. Not built yet (issue 5)."""
