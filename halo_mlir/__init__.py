"""halo_mlir: Llama 3.1, Mixtral and Grok-1 inference programs emitted directly as IREE MLIR."""

from halo_mlir.api import EmitOptions, LlamaConfig, emit_module, from_hf_config, preset
from halo_mlir.support.version import __version__

__all__ = ["__version__", "EmitOptions", "LlamaConfig", "emit_module", "from_hf_config", "preset"]
