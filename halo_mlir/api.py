"""The public Python API: emit a model's module (Llama, Mixtral, Grok-1), in your `ir.Context`
or a fresh one."""

from __future__ import annotations

import sys
from pathlib import Path

from halo_mlir.config import LlamaConfig, from_hf_config, preset
from halo_mlir.support.io import atomic_write
from halo_mlir.model.decoder import EmitOptions, emit_module

__all__ = ["EmitOptions", "LlamaConfig", "emit_module", "emit_to_file", "from_hf_config",
           "module_text", "preset", "write_module"]


def module_text(module, *, locations: bool = True) -> str:
    """Text MLIR that every IREE release in `compat.TABLE` parses (the same text whichever
    of them is installed)."""
    from halo_mlir.toolchain.compat import portable_asm

    return portable_asm(module.operation.get_asm(enable_debug_info=locations))


def write_module(module, path: str | Path, *, locations: bool = True) -> int:
    """Write text MLIR (or bytecode for `.mlirbc`, which only the installed IREE release
    reads) atomically; returns the byte count. `-` prints text to stdout."""
    if str(path) == "-":
        text = module_text(module, locations=locations)
        sys.stdout.write(text)
        return len(text)
    path = Path(path)
    if path.suffix == ".mlirbc":
        with atomic_write(path, "wb") as f:
            module.operation.write_bytecode(f)
            return f.tell()
    with atomic_write(path, "w") as f:
        f.write(module_text(module, locations=locations))
        return f.tell()


def emit_to_file(cfg: LlamaConfig, opts: EmitOptions, path: str | Path, *,
                 locations: bool = True, tp: int = 1, allreduce: str = "auto",
                 allreduce_dtype: str = "activation"):
    """Emit (sharded over `tp` devices when tp > 1) and write; returns (bytes, report).
    `allreduce`, `allreduce_dtype`: see `sharding_passes.collectives` (MODES, PAYLOADS).
    `opts.moe_parallel="expert"`: expert parallelism (whole experts per device, one group
    of experts per device)."""
    from halo_mlir.sharding_passes.plan import check_divisible

    check_divisible(cfg, tp, opts.moe_parallel)
    if opts.moe_parallel == "expert":
        import dataclasses
        opts = dataclasses.replace(opts, moe_groups=tp)
    module = emit_module(cfg, opts)
    report = None
    if tp > 1:
        from halo_mlir.sharding_passes.pipeline import shard_module

        report = shard_module(module, tp, allreduce=allreduce, allreduce_dtype=allreduce_dtype)
    with module.context:
        return write_module(module, path, locations=locations), report


def read_module(path: str | Path):
    """Parse a text or bytecode MLIR file into a fresh context."""
    from halo_mlir.errors import HaloError

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise HaloError(f"{path}: cannot read ({e.strerror})") from None
    if path.suffix != ".mlirbc":
        try:
            data = data.decode()
        except UnicodeDecodeError:
            raise HaloError(f"{path}: not text MLIR (name bytecode files .mlirbc)") from None
    return parse_module(data, str(path))


def parse_module(data: str | bytes, where: str):
    from iree.compiler import ir

    from halo_mlir.errors import HaloError

    try:
        return ir.Module.parse(data, ir.Context())
    except ir.MLIRError as e:
        raise HaloError(f"{where}: not valid MLIR ({' '.join(str(e).split())[:300]})") from None
