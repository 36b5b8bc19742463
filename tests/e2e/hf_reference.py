"""The independent reference: HF transformers' LlamaForCausalLM with random weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# The awkward config from the core issue: GQA (6 heads, 2 kv heads), head_dim 16, llama3
# rope scaling with a short original context so the scaling changes most frequencies.
AWKWARD = dict(
    vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
    num_attention_heads=6, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
    max_position_embeddings=512, rope_theta=500000.0, tie_word_embeddings=False,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
)


def make_model(out_dir: Path, seed: int = 0, **overrides):
    """Random-weight LlamaForCausalLM saved as safetensors + config.json in out_dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**AWKWARD, **overrides}, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger-than-init weights so errors are not hidden by tiny logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def logits(model, tokens: list[int]) -> np.ndarray:
    """f32 logits [len(tokens), vocab] for one unpadded row."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([tokens], dtype=torch.long)).logits[0]
    return out.float().numpy()


def config_json(out_dir: Path) -> dict:
    return json.loads((out_dir / "config.json").read_text())
