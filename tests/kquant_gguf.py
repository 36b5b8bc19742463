"""Small llama GGUF files whose matrices are in llama.cpp block formats, K-quants included.

The gguf package cannot quantize Q4_K/Q6_K, so their tensors are random super-blocks
(halo_mlir.kernels.quantized.random_blocks); other block types are quantized by gguf from
normal weights. The config is awkward on purpose: the FFN width (320) is not a whole number
of 256-element super-blocks, so `ffn_down` must be stored in a 32-block format, as llama.cpp
itself falls back (Q5_0 for Q4_K, Q8_0 for Q6_K); the vocabulary (40) is not a power of two.
"""

from __future__ import annotations

import numpy as np

CFG = dict(hidden=256, layers=2, heads=4, kv_heads=2, ffn=320, vocab=40)
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

# name -> GGML type of each matrix (norms are F32); a callable on the tensor name.
Q4_K = lambda name: "Q5_0" if "ffn_down" in name else "Q4_K"  # noqa: E731
Q6_K = lambda name: "Q8_0" if "ffn_down" in name else "Q6_K"  # noqa: E731


def q4_k_m(name: str) -> str:
    """llama.cpp's Q4_K_M mix, roughly: Q6_K for the output and V, Q4_K elsewhere,
    ffn_down Q8_0 in layer 0 and Q5_0 (no native kernel: dequantized) in layer 1."""
    if name == "output.weight" or "attn_v" in name:
        return "Q6_K"
    if "ffn_down" in name:
        return "Q8_0" if name.startswith("blk.0.") else "Q5_0"
    return "Q4_K"


def shapes(cfg: dict = CFG) -> dict[str, tuple[int, ...]]:
    d, f, v = cfg["hidden"], cfg["ffn"], cfg["vocab"]
    kv = cfg["kv_heads"] * d // cfg["heads"]
    out = {"token_embd.weight": (v, d), "output_norm.weight": (d,), "output.weight": (v, d)}
    for i in range(cfg["layers"]):
        out.update({f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.ffn_norm.weight": (d,),
                    f"blk.{i}.attn_q.weight": (d, d), f"blk.{i}.attn_k.weight": (kv, d),
                    f"blk.{i}.attn_v.weight": (kv, d), f"blk.{i}.attn_output.weight": (d, d),
                    f"blk.{i}.ffn_gate.weight": (f, d), f"blk.{i}.ffn_up.weight": (f, d),
                    f"blk.{i}.ffn_down.weight": (d, f)})
    return out


def write(path, qtype, seed: int = 0, **changes) -> dict[str, str]:
    """Write the GGUF (CFG with `changes`); `qtype(name)` is the GGML type of each matrix.
    Returns {name: type}."""
    import gguf

    from halo_mlir.kernels.quantized import random_blocks

    cfg = {**CFG, **changes}
    rng = np.random.default_rng(seed)
    d = cfg["hidden"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["layers"])
    w.add_embedding_length(d)
    w.add_feed_forward_length(cfg["ffn"])
    w.add_head_count(cfg["heads"])
    w.add_head_count_kv(cfg["kv_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_context_length(256)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg["vocab"])])
    w.add_token_merges(["t 1"])
    w.add_eos_token_id(1)
    types = {}
    for name, shape in shapes(cfg).items():
        if len(shape) == 1:
            w.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            continue
        types[name] = t = qtype(name)
        kind = gguf.GGMLQuantizationType[t]
        if t in ("Q4_K", "Q6_K"):
            raw = random_blocks(t.lower(), *shape, rng, kinds=False, top=0.3)
        else:
            raw = gguf.quants.quantize((0.08 * rng.standard_normal(shape)).astype(np.float32),
                                       kind)
        w.add_tensor(name, raw, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


def dequantized(path) -> dict[str, np.ndarray]:
    """gguf's own dequantization of every tensor as stored (GGUF row order), [out, in]."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(
        [int(x) for x in reversed(t.shape.tolist())]) for t in reader.tensors}


def tp_mix(name: str) -> str:
    """Every native format in one file: layer 0 as q4_k_m (Q4_K, Q6_K, Q8_0), layer 1
    Q4_1 attention and Q8_0 FFN, Q4_K embedding, Q6_K output."""
    if name.startswith("blk.1."):
        return "Q4_1" if "attn" in name else "Q8_0"
    return q4_k_m(name)


def q4_k_m_layers(name: str) -> str:
    """llama.cpp's Q4_K_M as it varies by layer (its `use_more_bits` layers get Q6_K): with
    FFN 512 (2 super-blocks) ffn_down is a K-quant, Q6_K in layer 0 and Q4_K in layer 1;
    attn_v Q4_K in layer 0 and Q6_K in layer 1; attn_q Q8_0 in layer 0 and Q5_0 (no native
    kernel) in layer 1; the other matrices Q4_K in every layer, the output Q6_K."""
    layer0 = name.startswith("blk.0.")
    if "ffn_down" in name:
        return "Q6_K" if layer0 else "Q4_K"
    if "attn_v" in name:
        return "Q4_K" if layer0 else "Q6_K"
    if "attn_q" in name:
        return "Q8_0" if layer0 else "Q5_0"
    return "Q6_K" if name == "output.weight" else "Q4_K"
