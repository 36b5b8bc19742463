"""`plan --hf-config` of a published FP8 checkpoint's config.json: per-device weights with
the checkpoint's own fp8 linears (the rest in 2 bytes) and a KV cache in the activation
dtype (no cache scales), next to `--dtype fp8` (every block linear fp8, an fp8 cache), for
Llama 3.1 405B at TP8 in the two published layouts. The expected bytes are counted here
from the model's shapes, not by the planner's code."""

from __future__ import annotations

import json

from conftest import halo

L405 = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
            hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
            num_attention_heads=128, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
            rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
# Meta's FP8 405B: only the MLPs of blocks 1-124 in fp8 (transformers'
# quantize_fp8_llama.py list: docs/fp8-checkpoints.md).
FBGEMM = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
          "modules_to_not_convert": ["model.layers.0", "model.layers.125", "lm_head",
                                     *(f"model.layers.{i}.self_attn" for i in range(1, 125))]}
COMPRESSED = {"quant_method": "compressed-tensors", "format": "float-quantized",
              "ignore": ["lm_head"],
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                  "num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel",
                  "dynamic": False}, "input_activations": {
                  "num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                  "dynamic": True}}}}


def expected_weight_bytes(fp8_mlp_layers, fp8_attention_layers, tp=8):
    h, f, v, n = 16384, 53248, 128256, 126
    attn = 2 * h * h + 2 * 1024 * h  # q, o; k, v (8 kv heads x 128)
    mlp = 3 * h * f
    total = v * h * 2 + v * h // tp * 2 + h * 2  # embedding (whole), lm_head (split), norm
    for i in range(n):
        total += 2 * h * 2  # the block's two norms
        total += attn // tp * (1 if i in fp8_attention_layers else 2)
        total += mlp // tp * (1 if i in fp8_mlp_layers else 2)
    return total


def plan(tmp_path, quant, *extra):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**L405, **({"quantization_config": quant} if quant else {})}))
    return json.loads(halo("plan", "--hf-config", path, "--tp", 8, "--json", *extra).stdout)


def test_published_fp8_layouts_against_ours(tmp_path):
    ours = plan(tmp_path, None, "--dtype", "fp8")
    meta = plan(tmp_path, FBGEMM)
    neural = plan(tmp_path, COMPRESSED)
    every = set(range(126))
    assert ours["per_device"]["weight_bytes"] == expected_weight_bytes(every, every)
    assert neural["per_device"]["weight_bytes"] == expected_weight_bytes(every, every)
    assert meta["per_device"]["weight_bytes"] == expected_weight_bytes(set(range(1, 125)), set())
    # no cache scales in either checkpoint: 2-byte KV, twice ours per token
    assert ours["kv_dtype"] == "fp8" and meta["kv_dtype"] == neural["kv_dtype"] == "f16"
    assert meta["per_device"]["kv_bytes_per_token"] == \
        2 * ours["per_device"]["kv_bytes_per_token"]
    assert "372 of 882 linears in fp8" in meta["checkpoint_scheme"]
    for name, p in (("ours", ours), ("compressed-tensors", neural), ("fbgemm", meta)):
        d = p["per_device"]
        print(f"405B TP8 {name}: weights {d['weight_bytes'] / 1e9:.1f} GB, KV "
              f"{d['kv_bytes_per_token']} B/token, max tokens {d['max_tokens']:,}")


def test_dtype_given_overrides_the_checkpoint(tmp_path):
    f16 = plan(tmp_path, FBGEMM, "--dtype", "f16")
    assert f16["dtype"] == "f16" and "checkpoint_scheme" not in f16
    assert f16["per_device"]["weight_bytes"] == expected_weight_bytes(set(), set())
