"""docs/ABI.md parameter keys, their shapes, and the HF checkpoint names they come from."""

from __future__ import annotations

import re

from halo_mlir.config import LlamaConfig

# ABI key template -> HF (transformers LlamaForCausalLM) name template.
HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def block_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of one decoder block's weights, by key template (`blk.{i}.` prefix)."""
    d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_dim
    return {
        "blk.{i}.attn_norm.weight": (d,),
        "blk.{i}.attn_q.weight": (cfg.n_heads * hd, d),
        "blk.{i}.attn_k.weight": (cfg.n_kv_heads * hd, d),
        "blk.{i}.attn_v.weight": (cfg.n_kv_heads * hd, d),
        "blk.{i}.attn_output.weight": (d, cfg.n_heads * hd),
        "blk.{i}.ffn_norm.weight": (d,),
        "blk.{i}.ffn_gate.weight": (f, d),
        "blk.{i}.ffn_up.weight": (f, d),
        "blk.{i}.ffn_down.weight": (d, f),
    }


def param_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every ABI key the model reads, in a fixed order, with its shape."""
    shapes = {"token_embd.weight": (cfg.vocab_size, cfg.hidden_size)}
    for i in range(cfg.n_layers):
        shapes.update({k.format(i=i): s for k, s in block_shapes(cfg).items()})
    shapes["output_norm.weight"] = (cfg.hidden_size,)
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


_LAYER = re.compile(r"^blk\.(\d+)\.(.*)$")

# Parameter layouts: `per-layer` (docs/ABI.md, the default: `blk.{i}.attn_q.weight`) or `stacked`
# (one entry per weight kind holding every layer, `[layers, ...]`, for `--layer-loop`).
LAYOUTS = ("per-layer", "stacked")
STACKED_SUFFIX = ".stacked"


def stacked_key(key: str) -> str | None:
    """`blk.3.attn_q.weight` -> `blk.attn_q.weight.stacked` (a `:field` suffix of a
    quantized entry stays last: `blk.attn_q.weight.stacked:qs`); None for non-block keys."""
    m = _LAYER.match(key)
    if not m:
        return None
    base, sep, field = m.group(2).partition(":")
    return f"blk.{base}{STACKED_SUFFIX}{sep}{field}"


def layer_of(key: str) -> int | None:
    m = _LAYER.match(key)
    return int(m.group(1)) if m else None


def hf_name(key: str) -> str:
    """The HF checkpoint name of an ABI key (`blk.3.attn_q.weight` -> `model.layers.3...`)."""
    m = _LAYER.match(key)
    if m:
        return HF_NAMES["blk.{i}." + m.group(2)].format(i=m.group(1))
    return HF_NAMES[key]
