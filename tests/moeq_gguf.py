"""Small Grok-shaped GGUF files whose stacked experts (`ffn_*_exps`) are in llama.cpp block
formats, written with the `gguf` package in llama.cpp's `grok` naming.

Q8_0 / Q4_1 experts are quantized by gguf from normal weights; Q4_K / Q6_K (which gguf cannot
quantize) are random super-blocks (halo_mlir.kernels.quantized.random_blocks). Everything
else (attention, norms, router, embeddings) is F32. Hidden 256 and expert FFN 512 are whole
super-blocks (1 and 2), so every expert matrix of every format stays quantized, and
`ffn_down_exps` (512 input columns, 2 super-blocks) splits at a block boundary for --tp 2.
"""

from __future__ import annotations

import numpy as np

D, L, H, KV, HD, F, E, K, V = 256, 2, 4, 2, 64, 512, 4, 2, 64
EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")

# The experts' format per layer: all four formats, and each of gate, up, down in a K-quant
# and a 32-block format somewhere (unrolled emission takes a different format per layer).
MIXED = {0: {"ffn_gate_exps": "Q8_0", "ffn_up_exps": "Q4_K", "ffn_down_exps": "Q4_1"},
         1: {"ffn_gate_exps": "Q4_K", "ffn_up_exps": "Q6_K", "ffn_down_exps": "Q4_K"}}
# One format per kind in every layer (what --layer-loop needs).
UNIFORM = {i: {"ffn_gate_exps": "Q4_K", "ffn_up_exps": "Q8_0", "ffn_down_exps": "Q4_K"}
           for i in range(L)}


def shapes() -> dict[str, tuple[int, ...]]:
    out = {"token_embd.weight": (V, D), "output_norm.weight": (D,)}
    for i in range(L):
        p = f"blk.{i}."
        out.update({p + "attn_norm.weight": (D,), p + "attn_q.weight": (H * HD, D),
                    p + "attn_k.weight": (KV * HD, D), p + "attn_v.weight": (KV * HD, D),
                    p + "attn_output.weight": (D, H * HD), p + "attn_output_norm.weight": (D,),
                    p + "ffn_norm.weight": (D,), p + "ffn_gate_inp.weight": (E, D),
                    p + "ffn_gate_exps.weight": (E, F, D), p + "ffn_up_exps.weight": (E, F, D),
                    p + "ffn_down_exps.weight": (E, D, F), p + "layer_output_norm.weight": (D,)})
    return out


def write(path, formats=MIXED, seed: int = 0) -> dict[str, str]:
    """Write the GGUF; returns {expert tensor name: GGML type}."""
    import gguf

    from halo_mlir.kernels.quantized import random_blocks

    rng = np.random.default_rng(seed)
    g = gguf.GGUFWriter(str(path), "grok")
    g.add_name("grok-moeq")
    g.add_block_count(L)
    g.add_context_length(128)
    g.add_embedding_length(D)
    g.add_feed_forward_length(F)
    g.add_head_count(H)
    g.add_head_count_kv(KV)
    g.add_rope_dimension_count(HD)
    g.add_rope_freq_base(10000.0)
    g.add_layer_norm_rms_eps(1e-5)
    g.add_expert_count(E)
    g.add_expert_used_count(K)
    g.add_vocab_size(V)
    types = {}
    for name, shape in shapes().items():
        kind = name.split(".")[-2]
        if kind in EXPERTS:
            t = types[name] = formats[int(name.split(".")[1])][kind]
            raw = random_blocks(t.lower(), shape[0] * shape[1], shape[2], rng, kinds=False,
                                top=0.12)
            g.add_tensor(name, raw.reshape(shape[0], shape[1], -1),
                         raw_dtype=gguf.GGMLQuantizationType[t])
        elif len(shape) == 1:
            g.add_tensor(name, (1 + 0.2 * rng.standard_normal(shape)).astype(np.float32))
        else:
            s = {"token_embd": 0.05, "ffn_gate_inp": 0.5}.get(kind, 0.08)
            g.add_tensor(name, (s * rng.standard_normal(shape)).astype(np.float32))
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()
    return types
