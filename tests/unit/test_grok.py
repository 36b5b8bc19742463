"""Grok-1: the preset against the published definition, the parameter names against
llama.cpp's grok tensor list, GGUF metadata, emission (deterministic, --tp 8, the
attention form) and its errors. The numerics are in tests/e2e/test_grok_vs_reference.py."""

import numpy as np
import pytest

from conftest import halo
from test_cli_errors import assert_one_line_error

from halo_mlir.config import PRESETS
from halo_mlir.params.names import param_shapes


def test_preset_is_the_published_model():
    """xai-org/grok-1 run.py: emb 6144, key 128, 48/8 heads, 64 layers, vocab 128*1024,
    widening 8 (ffn_size = 8 * 6144 * 2 // 3 rounded up to 8), 8 experts top-2, the three
    multipliers, the 30 cap; model.py: RoPE base 1e4, RMSNorm eps 1e-5, tied embeddings."""
    c = PRESETS["grok-1"]
    ffn = int(8 * 6144) * 2 // 3
    ffn += (8 - ffn) % 8
    assert (c.hidden_size, c.head_dim, c.n_heads, c.n_kv_heads, c.n_layers, c.vocab_size,
            c.ffn_dim) == (6144, 128, 48, 8, 64, 128 * 1024, ffn)
    assert (c.family, c.n_experts, c.experts_per_token, c.moe_renormalize) == ("grok", 8, 2, False)
    assert (c.attn_scale, c.attn_softcap) == (0.08838834764831845, 30.0)
    assert (c.embedding_scale, c.logit_scale) == (78.38367176906169, 0.5773502691896257)
    assert (c.rope_theta, c.rope_scaling, c.rms_eps, c.tie_embeddings) == (1e4, None, 1e-5, True)
    assert c.ffn_activation == "gelu_tanh" and c.max_seq_len == 8192
    # the other presets keep the plain defaults
    for name in ("8b", "mixtral-8x7b"):
        p = PRESETS[name]
        assert (p.attn_scale, p.attn_softcap, p.embedding_scale, p.logit_scale,
                p.ffn_activation) == (None, 0.0, 1.0, 1.0, "silu")


def test_parameter_names_are_llama_cpps_grok_names():
    """Every key is a tensor name of llama.cpp's GROK architecture (gguf-py's table), the
    four norms of a block are there, and the shapes follow the config."""
    import gguf

    c = PRESETS["grok-1"].with_layers(2)
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GROK]}
    shapes = param_shapes(c)
    for key in shapes:
        template = key.replace(".weight", "")
        template = template if not template.startswith("blk.") else \
            "blk.{bid}." + template.split(".", 2)[2]
        assert template in allowed, key
    for name in ("attn_norm", "attn_output_norm", "ffn_norm", "layer_output_norm"):
        assert shapes[f"blk.1.{name}.weight"] == (6144,)
    assert shapes["blk.0.ffn_gate_exps.weight"] == (8, 32768, 6144)
    assert shapes["blk.0.ffn_up_exps.weight"] == (8, 32768, 6144)
    assert shapes["blk.0.ffn_down_exps.weight"] == (8, 6144, 32768)
    assert shapes["blk.0.ffn_gate_inp.weight"] == (8, 6144)
    assert shapes["blk.0.attn_k.weight"] == (8 * 128, 6144)
    assert "output.weight" not in shapes  # tied: the output reads token_embd


def _grok_gguf(path, scales: bool):
    import gguf

    w = gguf.GGUFWriter(str(path), "grok")
    for key, value in (("block_count", 1), ("embedding_length", 32), ("feed_forward_length", 16),
                       ("attention.head_count", 4), ("attention.head_count_kv", 2),
                       ("expert_count", 4), ("expert_used_count", 2), ("vocab_size", 10)):
        w.add_uint32(f"grok.{key}", value)
    if scales:
        w.add_float32("grok.attention.output_scale", 0.25)
        w.add_float32("grok.attn_logit_softcapping", 10.0)
        w.add_float32("grok.embedding_scale", 2.0)
        w.add_float32("grok.logit_scale", 0.5)
    w.add_tensor("token_embd.weight", np.zeros((10, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("scales", [True, False])
def test_gguf_metadata(tmp_path, scales):
    """A `grok` GGUF reads as the grok family; without the scale keys, Grok-1's published
    values."""
    from halo_mlir.params.gguf_file import GgufFile

    path = tmp_path / "g.gguf"
    _grok_gguf(path, scales)
    with GgufFile(path) as g:
        c = g.config(check_experts=False)  # a metadata-only file
    assert (c.family, c.n_experts, c.experts_per_token, c.moe_renormalize,
            c.ffn_activation, c.head_dim) == ("grok", 4, 2, False, "gelu_tanh", 8)
    want = (0.25, 10.0, 2.0, 0.5) if scales else (0.08838834764831845, 30.0,
                                                   78.38367176906169, 0.5773502691896257)
    got = (c.attn_scale, c.attn_softcap, c.embedding_scale, c.logit_scale)
    assert np.allclose(got, want, rtol=1e-6), got


def test_emission_is_deterministic_and_decomposed(tmp_path):
    """grok-1 (1 layer) emits the same bytes twice; the default attention becomes the
    decomposed form with the cap (math.tanh in both entries' attention), no attention op."""
    a, b = tmp_path / "a.mlir", tmp_path / "b.mlir"
    for out in (a, b):
        halo("emit", "--model", "grok-1", "--layers", "1", "-o", out)
    assert a.read_bytes() == b.read_bytes()
    text = a.read_text()
    assert "iree_linalg_ext.attention" not in text
    assert "math.tanh" in text
    for key in ("attn_output_norm", "layer_output_norm"):
        assert f'"model"::"blk.0.{key}.weight"> : tensor<6144xf16>' in text
    assert '"model"::"output.weight"' not in text
    # Llama keeps no tanh anywhere (its emission is unchanged: tests/unit/test_emit.py)
    llama = tmp_path / "l.mlir"
    halo("emit", "--model", "toy", "--layers", "1", "--attention", "decomposed", "-o", llama)
    assert "math.tanh" not in llama.read_text()


@pytest.mark.parametrize("args", [["--moe-prefill", "gather"], ["--layer-loop"]])
def test_other_forms_emit(tmp_path, args):
    out = tmp_path / "x.mlir"
    halo("emit", "--model", "grok-1", "--layers", "2", *args, "-o", out)
    assert "math.tanh" in out.read_text()


def test_tp8(tmp_path):
    """--tp 8: one kv head a device, each expert's ffn rows split 8 ways, and one
    all-reduce per row-split weight use (the post-norms read the attention and MoE
    partial sums twice: all-reduced once each)."""
    out = tmp_path / "tp8.mlir"
    proc = halo("emit", "--model", "grok-1", "--layers", "1", "--tp", "8", "-o", out)
    text = out.read_text()
    for i in (0, 7):
        assert f'"model"::"blk.0.ffn_gate_exps.weight.shard.{i}"> : tensor<8x4096x6144xf16>' in text
        assert f'"model"::"blk.0.ffn_down_exps.weight.shard.{i}"> : tensor<8x6144x4096xf16>' in text
        assert f'"model"::"blk.0.attn_k.weight.shard.{i}"> : tensor<128x6144xf16>' in text
    assert "prefill_bs4: " in proc.stderr and "2 all-reduces" in proc.stderr
    assert "decode_bs4: " in proc.stderr


@pytest.mark.parametrize("args,needles", [
    (["--attention", "fused"], ["--attention fused cannot run the grok family",
                                "--attention decomposed"]),
    (["--dtype", "fp8", "--tp", "2", "--moe-parallel", "expert"],
     ["--moe-parallel expert does not run fp8 experts yet", "--moe-parallel ffn"]),
])
def test_unsupported_options_are_one_line_errors(tmp_path, args, needles):
    out = tmp_path / "x.mlir"
    proc = halo("emit", "--model", "grok-1", "--layers", "1", *args, "-o", out, check=False)
    assert_one_line_error(proc, *needles)
    assert not out.exists()


def test_plan_accounts_the_experts():
    """plan --model grok-1 --tp 8: the weights are every expert's (Grok-1's 314B-class
    parameter count, from the shapes), a bs-1 decode reads 2 of 8 experts a layer and does
    the FLOPs of the 2 (short context, so attention is negligible)."""
    import json

    c = PRESETS["grok-1"]
    h, f, e, hd = c.hidden_size, c.ffn_dim, c.n_experts, c.head_dim
    attn = h * (c.n_heads + 2 * c.n_kv_heads) * hd + c.n_heads * hd * h
    experts = 3 * e * f * h
    params = c.vocab_size * h + h + c.n_layers * (attn + e * h + 4 * h + experts)
    proc = halo("plan", "--model", "grok-1", "--tp", "8", "--max-seq-len", "32", "--json")
    p = json.loads(proc.stdout)
    assert p["params"] == params and 314e9 < params < 317e9
    # per device: split matrices / 8, the router, norms and the tied embedding whole
    replicated = c.vocab_size * h + h + c.n_layers * (e * h + 4 * h)
    assert p["per_device"]["weight_bytes"] == 2 * (replicated + c.n_layers * (attn + experts) // 8)
    active = c.n_layers * (attn + experts * 2 // 8) // 8 + c.n_layers * e * h
    flops = 2 * (active + c.vocab_size * h)  # + the tied lm_head
    assert abs(p["decode"]["flops"] - flops) / flops < 0.01, (p["decode"]["flops"], flops)
    weights_read = 2 * (active + c.vocab_size * h + h + c.n_layers * 4 * h)
    assert abs(p["decode"]["bytes_read"] - weights_read) / weights_read < 0.01


def test_moe_compile_flags(tmp_path):
    """compile adds the gfx942 MoE flag for modules with stacked experts only."""
    from halo_mlir.toolchain.compile import MOE_FLAGS, _moe_flags

    grok, toy = tmp_path / "g.mlir", tmp_path / "t.mlir"
    halo("emit", "--model", "grok-1", "--layers", "1", "-o", grok)
    halo("emit", "--model", "toy", "--layers", "1", "-o", toy)
    assert _moe_flags(grok, "gfx942") == MOE_FLAGS["gfx942"]
    assert _moe_flags(toy, "gfx942") == []
    assert _moe_flags(grok, "cpu") == []
