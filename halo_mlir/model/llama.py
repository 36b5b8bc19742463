"""The decoder's former home: `halo_mlir.model.decoder` emits every family (Llama included);
these names stay importable from here."""

from halo_mlir.model.decoder import (ATTENTION_FORMS, DTYPES, KV_CACHE_DTYPES,  # noqa: F401
                                     EmitOptions, emit_module, page_elems)
