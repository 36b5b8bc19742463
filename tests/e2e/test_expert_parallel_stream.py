"""What the GPU runs for expert parallelism: a toy mixture of experts (4 experts, top 2)
at TP2 with `--moe-parallel expert`, decode bs 4 compiled for gfx942 to the stream level
(only the compiler: runs on CPU) and read by `halo-mlir cost`, per device per layer as the
difference of 3 and 2 layers.

Each device runs its 2 whole experts over the step's tokens and sends its partial sum into
the block's all-reduce: per device per layer the two one-shot all-reduces' copies
(attention, experts) and nothing else copied, no host wait, and a device reads its own 2
experts' weights once (never the other device's): the weight bytes it reads are its
attention shard, the replicated router and norms, and 2 experts, worked out here from the
config (f16). Measured 2026-11-29 (IREE 3.13): 23 dispatches, 2 cross-device copies
(4 KB), 3 submissions per device per layer; the ceilings below are those numbers: they may
only come down."""

from __future__ import annotations

import json

import pytest

from conftest import halo

TP = 2
# A toy Mixtral: shapes small but multiples of the GPU tiles.
CONFIG = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
          "hidden_act": "silu", "hidden_size": 256, "intermediate_size": 512,
          "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 64, "vocab_size": 256, "max_position_embeddings": 4096,
          "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False,
          "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}


def _per_layer(tmp_path, mode: str) -> dict:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    paths = {}
    for layers in (2, 3):
        paths[layers] = tmp_path / f"{mode}{layers}.mlir"
        halo("emit", "--hf-config", tmp_path / "config.json", "--layers", layers, "--tp", TP,
             "--moe-parallel", mode, "--bs-prefill", 4, "--bs-decode", 4, "-o", paths[layers])
    d = json.loads(halo("cost", paths[3], "--minus", paths[2], "--target", "gfx942",
                        "--json").stdout)
    return next(e for e in d["entries"] if e["entry"] == "decode_bs4$async")[
        "per_layer_per_device"]


def test_expert_parallel_decode_at_the_stream_level(tmp_path):
    per = _per_layer(tmp_path, "expert")
    print(f"toy MoE TP{TP} --moe-parallel expert, decode bs4, per device per layer: "
          f"{ {k: v for k, v in per.items() if k != 'names'} }")
    assert per["cross_copies"] == 2 * (TP - 1)  # one-shot: attention, experts
    assert per["local_copies"] == 0 and per["host_waits"] == 0
    h, f, e = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["num_local_experts"]
    q = CONFIG["num_attention_heads"] * CONFIG["head_dim"]
    kv = CONFIG["num_key_value_heads"] * CONFIG["head_dim"]
    attention = (2 * q * h + 2 * kv * h) // TP
    router, norms, local_experts = e * h, 2 * h, (e // TP) * 3 * h * f
    assert per["weight_bytes_read"] == 2 * (attention + router + norms + local_experts)
    assert per["dispatches"] <= DISPATCHES and per["submissions"] <= SUBMISSIONS


DISPATCHES, SUBMISSIONS = 23, 3  # measured: see the module docstring
