"""The IREE toolchain: release differences, iree-compile flags per target, GPU specs, reading the ISA."""
