"""Templated MLIR kernels: typed parameters, checks before rendering, mangled names, one
instantiation per specialisation per module.

A kernel is a `templates/NAME.mlir.j2` file defining `util.func private @{{name}}`, plus a
`Kernel` entry (`registry.py`) saying what its parameters are and which values are legal. The
entries live next to their numpy references (`quantized.py`, `attention.py`, `fp8.py`,
`moe.py`), which the workbench (`halo-mlir kernel check`) and the tests share.
"""

from __future__ import annotations

from pathlib import Path

from halo_mlir.errors import lookup
from halo_mlir.kernels import attention, fp8, moe, quantized
from halo_mlir.kernels.registry import TEMPLATE_DIR, Kernel, render

__all__ = ["KERNELS", "TEMPLATE_DIR", "Kernel", "instantiate", "kernel", "render"]

KERNELS: dict[str, Kernel] = {k.name: k for k in [*quantized.KERNELS, *attention.KERNELS,
                                                  *fp8.KERNELS, *moe.KERNELS]}


def kernel(name: str) -> Kernel:
    return lookup(KERNELS, name, "kernel")


def instantiate(b, name: str, template_dir: Path | None = None, **values) -> str:
    """Render kernel `name` with `values` into b's module (once) and return its symbol."""
    symbol, text = render(kernel(name), values, template_dir or getattr(b, "template_dir", None))
    b.add_text_once(symbol, text)
    return symbol
