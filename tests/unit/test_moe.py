"""Mixtral (mixture of experts): config, parameter names and import, emission, errors, and
the MoE block's numerics against transformers' own MixtralSparseMoeBlock."""

import json

import numpy as np
import pytest

from conftest import halo
from test_cli_errors import assert_one_line_error

from halo_mlir.config import PRESETS, from_hf_dict
from halo_mlir.errors import HaloError

# The config.json of mistralai/Mixtral-8x7B-v0.1.
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
    "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "num_local_experts": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 1e6, "router_aux_loss_coef": 0.02, "sliding_window": None,
    "tie_word_embeddings": False, "vocab_size": 32000,
}
TINY = {**MIXTRAL_8X7B, "hidden_size": 32, "intermediate_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
        "num_local_experts": 3, "num_experts_per_tok": 2}


def test_presets():
    rows = {"mixtral-8x7b": (4096, 32, 32, 14336, 32000), "mixtral-8x22b": (6144, 56, 48, 16384, 32768)}
    for name, (hidden, layers, heads, ffn, vocab) in rows.items():
        c = PRESETS[name]
        assert (c.hidden_size, c.n_layers, c.n_heads, c.ffn_dim, c.vocab_size) == \
            (hidden, layers, heads, ffn, vocab)
        assert (c.family, c.n_experts, c.experts_per_token, c.moe_renormalize) == \
            ("mixtral", 8, 2, True)
        assert (c.n_kv_heads, c.head_dim, c.rope_theta, c.rms_eps, c.rope_scaling) == \
            (8, 128, 1e6, 1e-5, None)
    assert PRESETS["8b"].family == "llama" and not PRESETS["8b"].is_moe


def test_hf_config_equals_preset():
    c, p = from_hf_dict(MIXTRAL_8X7B), PRESETS["mixtral-8x7b"]
    for f in ("hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
              "vocab_size", "rope_theta", "rms_eps", "rope_scaling", "tie_embeddings",
              "family", "n_experts", "experts_per_token", "moe_renormalize", "max_seq_len"):
        assert getattr(c, f) == getattr(p, f), f


@pytest.mark.parametrize("change,message", [
    (dict(num_experts_per_tok=9), "experts_per_token must be in 1..8"),
    (dict(num_local_experts=0), "needs n_experts >= 1"),
    (dict(sliding_window=4096), "sliding_window 4096 is not supported"),
    (dict(model_type="grok"), "model_type 'grok' is not a Llama-family model or Mixtral"),
])
def test_bad_hf_config(change, message):
    with pytest.raises(HaloError, match=message):
        from_hf_dict({**MIXTRAL_8X7B, **change})


def test_parameter_names_and_shapes():
    from halo_mlir.params.names import block_weights, hf_sources, param_shapes

    cfg = from_hf_dict(TINY)
    shapes = param_shapes(cfg)
    assert shapes["blk.1.ffn_gate_inp.weight"] == (3, 32)
    assert shapes["blk.1.ffn_gate_exps.weight"] == (3, 24, 32)
    assert shapes["blk.1.ffn_up_exps.weight"] == (3, 24, 32)
    assert shapes["blk.1.ffn_down_exps.weight"] == (3, 32, 24)
    assert not any(".ffn_gate.weight" in k or ".ffn_down.weight" in k for k in shapes)
    assert block_weights(cfg)[-4:] == ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps",
                                       "ffn_down_exps")
    assert hf_sources("blk.1.ffn_gate_inp.weight", cfg) == \
        ["model.layers.1.block_sparse_moe.gate.weight"]
    assert hf_sources("blk.1.ffn_down_exps.weight", cfg) == \
        [f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight" for e in range(3)]
    assert hf_sources("blk.0.attn_q.weight", cfg) == ["model.layers.0.self_attn.q_proj.weight"]


def _tiny_checkpoint(d, drop=None):
    from safetensors.numpy import save_file

    from halo_mlir.params.names import hf_sources, param_shapes

    cfg = from_hf_dict(TINY)
    rng = np.random.default_rng(0)
    tensors = {}
    for key, shape in param_shapes(cfg).items():
        names = hf_sources(key, cfg)
        for name in names:
            tensors[name] = rng.standard_normal(shape[1:] if len(names) > 1 else shape
                                                ).astype(np.float32)
    if drop:
        del tensors[drop]
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(TINY))
    return tensors


def test_import_stacks_the_experts(tmp_path):
    """Each layer's experts become one [experts, ...] entry, expert e at index e
    (w1 -> ffn_gate_exps, w3 -> ffn_up_exps, w2 -> ffn_down_exps), read back from the IRPA."""
    from test_layout import entries

    tensors = _tiny_checkpoint(tmp_path)
    out = tmp_path / "m.irpa"
    halo("import-params", "--safetensors", tmp_path, "--dtype", "f32", "-o", out)
    written = entries(out)

    def read(key, shape):
        return written[key].reshape(shape)

    for key, kind in (("ffn_gate_exps", "w1"), ("ffn_up_exps", "w3"), ("ffn_down_exps", "w2")):
        want = np.stack([tensors[f"model.layers.1.block_sparse_moe.experts.{e}.{kind}.weight"]
                         for e in range(3)])
        got = read(f"blk.1.{key}.weight", want.shape)
        np.testing.assert_array_equal(got, want)
    router = tensors["model.layers.0.block_sparse_moe.gate.weight"]
    np.testing.assert_array_equal(read("blk.0.ffn_gate_inp.weight", router.shape), router)


def test_import_names_a_missing_expert(tmp_path):
    _tiny_checkpoint(tmp_path, drop="model.layers.1.block_sparse_moe.experts.2.w3.weight")
    out = tmp_path / "m.irpa"
    proc = halo("import-params", "--safetensors", tmp_path, "-o", out, check=False)
    assert_one_line_error(proc, "experts.2.w3.weight", "blk.1.ffn_up_exps.weight")
    assert not out.exists()


def test_emission_is_deterministic_and_verifies(tmp_path):
    """The Mixtral 8x7B preset (2 layers) emits the same bytes twice, and IREE's parser and
    verifier accept it (iree-opt), with the stacked expert globals."""
    import subprocess
    import sys
    from pathlib import Path

    a, b = tmp_path / "a.mlir", tmp_path / "b.mlir"
    for out in (a, b):
        halo("emit", "--model", "mixtral-8x7b", "--layers", "2", "--bs-prefill", "1,4", "-o", out)
    assert a.read_bytes() == b.read_bytes()
    opt = Path(sys.executable).with_name("iree-opt")
    proc = subprocess.run([str(opt), str(a), "-o", str(tmp_path / "v.mlir")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = a.read_text()
    assert '"model"::"blk.1.ffn_gate_exps.weight"> : tensor<8x14336x4096xf16>' in text
    assert '"model"::"blk.1.ffn_down_exps.weight"> : tensor<8x4096x14336xf16>' in text
    assert '"model"::"blk.1.ffn_gate_inp.weight"> : tensor<8x4096xf16>' in text


@pytest.mark.parametrize("args,needles", [
    (["--dtype", "fp8", "--tp", "2", "--moe-parallel", "expert"],
     ["--moe-parallel expert does not run fp8 experts yet", "--moe-parallel ffn"]),
])
def test_unsupported_options_are_one_line_errors(tmp_path, args, needles):
    out = tmp_path / "x.mlir"
    proc = halo("emit", "--model", "mixtral-8x7b", "--layers", "1", *args, "-o", out,
                check=False)
    assert_one_line_error(proc, *needles)
    assert not out.exists()


def test_plan_accounts_the_experts(tmp_path):
    """plan holds every expert's weights and counts all of Mixtral 8x7B's parameters
    (46.7B, computed here from the HF config's shapes)."""
    c = from_hf_dict(MIXTRAL_8X7B)
    h, f, e = c.hidden_size, c.ffn_dim, c.n_experts
    layer = 2 * h + h * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * h \
        + e * h + 3 * e * f * h
    params = 2 * c.vocab_size * h + h + c.n_layers * layer
    proc = halo("plan", "--model", "mixtral-8x7b", "--json")
    assert json.loads(proc.stdout)["params"] == params


def test_moe_gguf_is_a_one_line_error(tmp_path):
    """A llama.cpp MoE GGUF (expert_count set) is refused by name, not half-imported."""
    import gguf

    path = tmp_path / "moe.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.expert_count", 8)
    w.add_uint32("llama.block_count", 1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "x.irpa"
    proc = halo("import-params", "--gguf", path, "-o", out, check=False)
    assert_one_line_error(proc, "mixture-of-experts GGUF", "expert_count = 8")
    assert not out.exists()


def test_tp2_splits_each_experts_ffn_rows(tmp_path):
    """--tp 2: gate/up experts split along ffn rows, down along its ffn columns, the router
    replicated (one global per device), and the emission verifies."""
    out = tmp_path / "tp2.mlir"
    proc = halo("emit", "--model", "mixtral-8x7b", "--layers", "1", "--tp", "2", "-o", out)
    text = out.read_text()
    for i in range(2):
        assert f'"model"::"blk.0.ffn_gate_exps.weight.shard.{i}"> : tensor<8x7168x4096xf16>' in text
        assert f'"model"::"blk.0.ffn_up_exps.weight.shard.{i}"> : tensor<8x7168x4096xf16>' in text
        assert f'"model"::"blk.0.ffn_down_exps.weight.shard.{i}"> : tensor<8x4096x7168xf16>' in text
    assert text.count('"model"::"blk.0.ffn_gate_inp.weight"> : tensor<8x4096xf16>') == 2
    assert "ffn_gate_inp.weight.shard" not in text
    # one all-reduce per layer and entry (attention output, experts): 2 per entry here
    assert "prefill_bs4: " in proc.stderr and "2 all-reduces" in proc.stderr


def test_import_tp2_stacked_splits_each_expert(tmp_path):
    """`import-params --tp 2 --layout stacked`: device r holds rows [r*F/2, (r+1)*F/2) of
    every expert's gate (and the same columns of down) of every layer; the router is
    stored once (replicated)."""
    import iree.runtime as rt

    tensors = _tiny_checkpoint(tmp_path)
    halo("import-params", "--safetensors", tmp_path, "--dtype", "f32", "--tp", 2,
         "--layout", "stacked", "-o", tmp_path / "s.irpa")
    f, half = TINY["intermediate_size"], TINY["intermediate_size"] // 2
    for r in range(2):
        index = rt.ParameterIndex()
        index.load(str(tmp_path / f"s.rank{r}.irpa"))
        got = {k: np.frombuffer(memoryview(v.file_view), np.float32) for k, v in index.items()}
        assert ("blk.ffn_gate_inp.weight.stacked" in got) == (r == 0)
        gate = got[f"blk.ffn_gate_exps.weight.stacked.shard.{r}"].reshape(2, 3, half, 32)
        down = got[f"blk.ffn_down_exps.weight.stacked.shard.{r}"].reshape(2, 3, 32, half)
        for layer in range(2):
            for e in range(3):
                w1 = tensors[f"model.layers.{layer}.block_sparse_moe.experts.{e}.w1.weight"]
                w2 = tensors[f"model.layers.{layer}.block_sparse_moe.experts.{e}.w2.weight"]
                np.testing.assert_array_equal(gate[layer, e], w1[r * half:(r + 1) * half])
                np.testing.assert_array_equal(down[layer, e], w2[:, r * half:(r + 1) * half])
        assert f == 2 * half
