"""config.json beside the MLIR: the shortfin model config (docs/ABI.md)."""

from __future__ import annotations

from halo_mlir.config import LlamaConfig
from halo_mlir.model.decoder import EmitOptions


# Our dtype names -> the names sharktank writes into config.json.
KV_DTYPE_NAMES = {"f16": "float16", "bf16": "bfloat16", "f32": "float32",
                  "f8E4M3FNUZ": "float8_e4m3fnuz"}


def service_config(cfg: LlamaConfig, opts: EmitOptions, *, device_block_count: int = 256,
                   tp: int = 1) -> dict:
    """Exactly the keys shortfin's parser accepts (it rejects unknown top-level keys)."""
    per_device = cfg.page_elems(opts.block_seq_stride, tp)
    return {
        "module_name": "module",
        "module_abi_version": 1,
        "max_seq_len": cfg.max_seq_len,
        "attn_head_dim": cfg.head_dim,
        "prefill_batch_sizes": sorted(set(opts.bs_prefill)),
        "decode_batch_sizes": sorted(set(opts.bs_decode)),
        "transformer_block_count": cfg.n_layers,
        "logits_normalization": "none",
        "top_k": None,
        "paged_kv_cache": {
            "attention_head_count_kv": cfg.n_kv_heads,
            "block_seq_stride": opts.block_seq_stride,
            "device_block_count": device_block_count,
            "kv_cache_dtype": KV_DTYPE_NAMES[opts.cache_dtype],
            "paged_kv_block_size_elements_per_device": [per_device] * tp,
        },
    }
