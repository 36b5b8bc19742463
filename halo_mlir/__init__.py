"""halo_mlir: Llama 3.1 inference programs emitted directly as IREE MLIR."""

__version__ = "0.1.0"

from halo_mlir.api import EmitOptions, LlamaConfig, emit_module, from_hf_config, preset

__all__ = ["EmitOptions", "LlamaConfig", "emit_module", "from_hf_config", "preset"]
