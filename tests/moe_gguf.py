"""Mixtral as llama.cpp writes it: a `llama` GGUF with expert metadata and stacked expert
tensors, made here with the `gguf` package from HF-named weights (no halo_mlir code).

What llama.cpp's convert_hf_to_gguf.py does for MixtralForCausalLM (a LlamaModel): Q/K rows
permuted for its RoPE, each layer's `block_sparse_moe.experts.{e}.w1/w3/w2` stacked into
`blk.N.ffn_gate_exps` / `ffn_up_exps` / `ffn_down_exps` ([experts, out, in]), the router
`block_sparse_moe.gate` as `blk.N.ffn_gate_inp`, and `llama.expert_count` /
`llama.expert_used_count` from `num_local_experts` / `num_experts_per_tok`. Files converted
before the stacked names hold one tensor per expert (`blk.N.ffn_gate.E.weight`):
`per_expert=True` writes that layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_NAMES = {  # llama.cpp name (after blk.N.) <- HF name (after model.layers.N.)
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate_inp": "block_sparse_moe.gate"}
_EXPERTS = {"gate": "w1", "up": "w3", "down": "w2"}


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute of HF Q/K rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_level_bpe(vocab_size: int, eos: str = "<|endoftext|>"):
    """A byte-level BPE tokenizer (`tokenizers`) of exactly `vocab_size` tokens, trained on
    the calibration text shipped in halo_mlir/data, with `eos` as token 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = (Path(__file__).resolve().parents[1] / "halo_mlir" / "data" / "calibration.txt").read_text()
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[eos], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tk.get_vocab_size() == vocab_size, tk.get_vocab_size()
    return tk


def add_tokenizer(w, tk, eos: str = "<|endoftext|>") -> None:
    """tokenizer.ggml.* metadata of the `tokenizers` BPE `tk` (llama.cpp's gpt2 kind)."""
    model = json.loads(tk.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == eos else 1 for t in tokens])  # 3: control
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index(eos))


def write_mixtral_gguf(path, tensors: dict[str, np.ndarray], hf: dict, *, qtype: str | None = None,
                       per_expert: bool = False, tokenizer=None, drop=(), replace=None,
                       metadata=None, extra=None) -> dict[str, np.ndarray]:
    """Write HF-named f32 `tensors` of the Mixtral `hf` config.json as llama.cpp's GGUF.
    `qtype` (e.g. "Q8_0"): every matrix stored in that block format (norms stay F32), as
    `gguf.quants.quantize` makes it. `drop`: GGUF names left out; `replace`: GGUF name ->
    array stored instead; `metadata`: llama.* keys -> values overriding the config's (None
    leaves a key out); `extra(writer)` adds more metadata.
    Returns HF name -> the f32 values a reader gets back (dequantized by gguf itself)."""
    import gguf

    heads, kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    layers, experts = hf["num_hidden_layers"], hf["num_local_experts"]
    named: dict[str, tuple[str, np.ndarray]] = {  # GGUF name -> (HF name, HF-order array)
        "token_embd.weight": ("model.embed_tokens.weight", tensors["model.embed_tokens.weight"]),
        "output_norm.weight": ("model.norm.weight", tensors["model.norm.weight"]),
        "output.weight": ("lm_head.weight", tensors["lm_head.weight"])}
    for i in range(layers):
        for ours, theirs in _NAMES.items():
            name = f"model.layers.{i}.{theirs}.weight"
            named[f"blk.{i}.{ours}.weight"] = (name, tensors[name])
        for kind, wid in _EXPERTS.items():
            per = [f"model.layers.{i}.block_sparse_moe.experts.{e}.{wid}.weight"
                   for e in range(experts)]
            if per_expert:
                for e, name in enumerate(per):
                    named[f"blk.{i}.ffn_{kind}.{e}.weight"] = (name, tensors[name])
            else:
                named[f"blk.{i}.ffn_{kind}_exps.weight"] = (
                    f"blk.{i}.ffn_{kind}_exps", np.stack([tensors[n] for n in per]))

    w = gguf.GGUFWriter(str(path), "llama")
    meta = {"block_count": layers, "context_length": hf["max_position_embeddings"],
            "embedding_length": hf["hidden_size"], "feed_forward_length": hf["intermediate_size"],
            "attention.head_count": heads, "attention.head_count_kv": kv,
            "rope.dimension_count": hf.get("head_dim") or hf["hidden_size"] // heads,
            "expert_count": experts, "expert_used_count": hf["num_experts_per_tok"],
            "vocab_size": hf["vocab_size"], **(metadata or {})}
    w.add_name("mixtral-tiny")
    for key, value in meta.items():
        if value is not None:
            w.add_uint32(f"llama.{key}", int(value))
    w.add_float32("llama.rope.freq_base", float(hf.get("rope_theta") or hf["rope_parameters"]["rope_theta"]))
    w.add_float32("llama.attention.layer_norm_rms_epsilon", float(hf["rms_norm_eps"]))
    if tokenizer is not None:
        add_tokenizer(w, tokenizer)
    if extra is not None:
        extra(w)
    back: dict[str, np.ndarray] = {}
    for name, (hf_name, array) in named.items():
        if name in drop:
            continue
        rows = {"attn_q": heads, "attn_k": kv}.get(name.split(".")[-2])
        stored = permute(array, rows) if rows else array
        if replace and name in replace:
            stored = replace[name]
        if qtype is None or stored.ndim == 1:
            w.add_tensor(name, stored.astype(np.float32))
            got = stored.astype(np.float32)
        else:
            t = gguf.GGMLQuantizationType[qtype]
            raw = gguf.quants.quantize(stored.astype(np.float32), t)
            w.add_tensor(name, raw, raw_dtype=t)
            got = gguf.quants.dequantize(raw, t).reshape(stored.shape)
        back[hf_name] = unpermute(got, rows) if rows else got
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = {}
    for hf_name, array in back.items():  # stacked experts back to HF's per-expert names
        if hf_name.endswith("_exps"):
            i, kind = hf_name.split(".")[1], hf_name.split(".")[2][len("ffn_"):-len("_exps")]
            for e in range(experts):
                out[f"model.layers.{i}.block_sparse_moe.experts.{e}.{_EXPERTS[kind]}.weight"] = array[e]
        else:
            out[hf_name] = array
    return out
