"""The public Python API: emit a Llama module, in your `ir.Context` or a fresh one."""

from __future__ import annotations

import sys
from pathlib import Path

from halo_mlir.config import LlamaConfig, from_hf_config, preset
from halo_mlir.io_utils import atomic_write
from halo_mlir.model.llama import EmitOptions, emit_module

__all__ = ["EmitOptions", "LlamaConfig", "emit_module", "emit_to_file", "from_hf_config",
           "preset", "write_module"]


def write_module(module, path: str | Path, *, locations: bool = True) -> int:
    """Write text MLIR (or bytecode for `.mlirbc`) atomically; returns the byte count.
    `-` prints text to stdout."""
    if str(path) == "-":
        text = module.operation.get_asm(enable_debug_info=locations)
        sys.stdout.write(text)
        return len(text)
    path = Path(path)
    if path.suffix == ".mlirbc":
        with atomic_write(path, "wb") as f:
            module.operation.write_bytecode(f)
            return f.tell()
    with atomic_write(path, "w") as f:
        module.operation.print(file=f, enable_debug_info=locations)
        return f.tell()


def emit_to_file(cfg: LlamaConfig, opts: EmitOptions, path: str | Path, *,
                 locations: bool = True) -> int:
    module = emit_module(cfg, opts)
    with module.context:
        return write_module(module, path, locations=locations)
