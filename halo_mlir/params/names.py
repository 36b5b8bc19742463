"""docs/ABI.md parameter keys, their shapes, and the HF checkpoint names they come from,
per model family (the block's attention part is shared; each family names its FFN)."""

from __future__ import annotations

import re

from halo_mlir.config import LlamaConfig
from halo_mlir.errors import HaloError

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

# Mixtral (transformers MixtralForCausalLM, as `save_pretrained` writes it): the router, and
# each layer's experts stacked into one entry per kind ([experts, ...], llama.cpp's GGUF
# names). `{e}` runs over the experts.
MIXTRAL_HF_NAMES = {
    **{k: v for k, v in HF_NAMES.items() if ".ffn_" not in k or "ffn_norm" in k},
    "blk.{i}.ffn_gate_inp.weight": "model.layers.{i}.block_sparse_moe.gate.weight",
    "blk.{i}.ffn_gate_exps.weight": "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
    "blk.{i}.ffn_up_exps.weight": "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
    "blk.{i}.ffn_down_exps.weight": "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
}
# The same model as transformers keeps it in memory (and a checkpoint saved without the
# legacy conversion): each layer's experts already stacked, gate and up fused into one
# tensor `gate_up_proj` [experts, 2 * ffn, hidden] (gate rows first, then up, as
# `MixtralExperts.forward` chunks them), `down_proj` [experts, hidden, ffn]. A source
# `NAME#0` / `NAME#1` is the first / second half of NAME's dim 1.
MIXTRAL_FUSED_HF_NAMES = {
    **{k: v for k, v in HF_NAMES.items() if ".ffn_" not in k or "ffn_norm" in k},
    "blk.{i}.ffn_gate_inp.weight": "model.layers.{i}.mlp.gate.weight",
    "blk.{i}.ffn_gate_exps.weight": "model.layers.{i}.mlp.experts.gate_up_proj#0",
    "blk.{i}.ffn_up_exps.weight": "model.layers.{i}.mlp.experts.gate_up_proj#1",
    "blk.{i}.ffn_down_exps.weight": "model.layers.{i}.mlp.experts.down_proj",
}
# The tensor whose presence marks a checkpoint as fused (checkpoint_layout).
FUSED_EXPERTS_MARK = "model.layers.0.mlp.experts.gate_up_proj"
# Grok-1 has no transformers port in the library; its parameters come from a GGUF in
# llama.cpp's `grok` naming (the ABI keys themselves), so it has no HF table.
FAMILY_HF_NAMES = {"llama": HF_NAMES, "mixtral": MIXTRAL_HF_NAMES}

# Grok-1's four norms a block (model.py DecoderLayer), by llama.cpp's names: rms_norm ->
# attn_norm (before attention), rms_norm_1 -> attn_output_norm (on the attention output,
# before the residual add), rms_norm_2 -> ffn_norm (before the MoE), rms_norm_3 ->
# layer_output_norm (on the MoE output, before the residual add).
POST_NORMS = {"grok": ("attn_output_norm", "layer_output_norm")}


def _ffn_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """The FFN part of a block: dense SwiGLU, or the router and stacked experts (MoE)."""
    d, f, e = cfg.hidden_size, cfg.ffn_dim, cfg.n_experts
    if cfg.is_moe:
        return {"blk.{i}.ffn_gate_inp.weight": (e, d),
                "blk.{i}.ffn_gate_exps.weight": (e, f, d),
                "blk.{i}.ffn_up_exps.weight": (e, f, d),
                "blk.{i}.ffn_down_exps.weight": (e, d, f)}
    return {"blk.{i}.ffn_gate.weight": (f, d),
            "blk.{i}.ffn_up.weight": (f, d),
            "blk.{i}.ffn_down.weight": (d, f)}


def block_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of one decoder block's weights, by key template (`blk.{i}.` prefix)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    post = {f"blk.{{i}}.{name}.weight": (d,) for name in POST_NORMS.get(cfg.family, ())}
    return {
        "blk.{i}.attn_norm.weight": (d,),
        "blk.{i}.attn_q.weight": (cfg.n_heads * hd, d),
        "blk.{i}.attn_k.weight": (cfg.n_kv_heads * hd, d),
        "blk.{i}.attn_v.weight": (cfg.n_kv_heads * hd, d),
        "blk.{i}.attn_output.weight": (d, cfg.n_heads * hd),
        "blk.{i}.ffn_norm.weight": (d,),
        **_ffn_shapes(cfg),
        **post,
    }


def block_weights(cfg: LlamaConfig) -> tuple[str, ...]:
    """The names of one block's weights in order (`attn_q`, ..., `ffn_down`)."""
    return tuple(k.split(".")[2] for k in block_shapes(cfg))


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


def hf_sources(key: str, cfg: LlamaConfig, fused: bool = False) -> list[str]:
    """The HF tensors an ABI key is made of, in order: one, or one per expert for a stacked
    expert entry (`blk.3.ffn_gate_exps.weight` <- `...experts.{0..E-1}.w1.weight`). With
    `fused` (a Mixtral checkpoint holding `mlp.experts.gate_up_proj`), the stacked tensor or
    a half of it (`NAME#0`, `NAME#1`: split_source)."""
    if cfg.family not in FAMILY_HF_NAMES:
        raise HaloError(f"the {cfg.family} family has no HF safetensors naming in halo_mlir; "
                        "import its GGUF (llama.cpp naming) with `import-params --gguf`")
    names = MIXTRAL_FUSED_HF_NAMES if fused and cfg.is_moe else FAMILY_HF_NAMES[cfg.family]
    m = _LAYER.match(key)
    template = names["blk.{i}." + m.group(2)] if m else names[key]
    layer = m.group(1) if m else None
    if "{e}" in template:
        return [template.format(i=layer, e=e) for e in range(cfg.n_experts)]
    return [template.format(i=layer)]


def split_source(source: str) -> tuple[str, int | None]:
    """`NAME#h` -> (NAME, h): half h of NAME's dim 1 (fused gate/up experts); else (NAME, None)."""
    name, sep, half = source.partition("#")
    return name, int(half) if sep else None


def fp8_param_entries(cfg, scales: str = "per-tensor") -> dict[str, tuple[tuple[int, ...], str]]:
    """Every parameter an FP8 model of `cfg` reads: key -> (shape, IR dtype); `float` marks
    the tensors kept in the activation dtype. Fixed order (per layer, as `param_shapes`).
    `scales`: the weight scales' scheme (per-tensor `KEY:d` [], per-channel `KEY:d_rows`
    [out])."""
    from halo_mlir.quantization import fp8

    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for key, shape in param_shapes(cfg).items():
        if fp8.is_expert(key):  # [E, out, in]: a scale per expert, or per expert and row
            qs, d = fp8.weight_keys(key, scales)
            out[qs] = (shape, fp8.FP8)
            out[d] = ((shape[0], shape[1]) if scales == "per-channel" else (shape[0],), "f32")
            out[fp8.input_scale_key(key.split(".")[1], key.split(".")[2])] = ((), "f32")
            continue
        if not fp8.is_linear(key):
            out[key] = (shape, "float")
            continue
        i, name = key.split(".")[1], key.split(".")[2]
        qs, d = fp8.weight_keys(key, scales)
        out[qs] = (shape, fp8.FP8)
        out[d] = ((shape[0],) if scales == "per-channel" else (), "f32")
        out[fp8.input_scale_key(i, name)] = ((), "f32")
        if name == "attn_q":
            out[fp8.q_scale_key(i)] = ((), "f32")
        if name == "attn_v":
            out[fp8.kv_scale_key(i)] = ((), "f32")
    return out
