import numpy as np
import pytest

from halo_mlir.config import PRESETS, from_hf_config, from_hf_dict, preset
from halo_mlir.errors import HaloError
from halo_mlir.config import inv_freq

# A real Llama 3.1 8B config.json (older layout: rope_theta + rope_scaling).
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "vocab_size": 128256,
}


def test_presets_match_abi_table():
    rows = {"8b": (4096, 32, 32, 14336), "70b": (8192, 80, 64, 28672),
            "405b": (16384, 126, 128, 53248)}
    for name, (hidden, layers, heads, ffn) in rows.items():
        c = PRESETS[name]
        assert (c.hidden_size, c.n_layers, c.n_heads, c.ffn_dim) == (hidden, layers, heads, ffn)
        assert (c.n_kv_heads, c.head_dim, c.vocab_size) == (8, 128, 128256)
        assert c.rope_theta == 500000 and c.rms_eps == 1e-5
        assert c.rope_scaling["factor"] == 8 and c.rope_scaling["high_freq_factor"] == 4


def test_old_layout_equals_preset():
    c = from_hf_dict(LLAMA31_8B)
    p = preset("8b")
    for f in ("hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
              "vocab_size", "rope_theta", "rms_eps", "rope_scaling", "tie_embeddings"):
        assert getattr(c, f) == getattr(p, f), f


def test_transformers5_layout_equals_old_layout():
    new = dict(LLAMA31_8B)
    scaling = new.pop("rope_scaling")
    new["rope_parameters"] = {**scaling, "rope_theta": new.pop("rope_theta")}
    assert from_hf_dict(new) == from_hf_dict(LLAMA31_8B)


def test_smollm_style_config():
    c = from_hf_dict({"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                      "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
                      "rope_theta": 100000, "tie_word_embeddings": True})
    assert c.head_dim == 64 and c.group_size == 3 and c.tie_embeddings
    assert c.rope_scaling is None


@pytest.mark.parametrize("scaling", [None, "llama3"])
def test_inv_freq_matches_transformers(scaling):
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = dict(LLAMA31_8B, head_dim=128)
    if scaling is None:
        d.pop("rope_scaling")
    hf = LlamaConfig(**d)
    kind = "llama3" if scaling else "default"
    if kind == "default":
        ref = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.int64).float() / 128))
    else:
        ref, _ = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    ours = inv_freq(128, 500000.0, from_hf_dict(d).rope_scaling)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "gpt2"}, "not a Llama-family"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
    ({"num_key_value_heads": 5}, "multiple of kv heads"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_hidden_layers": None}, "bad value"),
])
def test_bad_configs_name_the_problem(change, message):
    with pytest.raises(HaloError, match=message):
        from_hf_dict({**LLAMA31_8B, **change})


def test_missing_key_and_malformed_file(tmp_path):
    d = dict(LLAMA31_8B)
    del d["vocab_size"]
    with pytest.raises(HaloError, match="missing key 'vocab_size'"):
        from_hf_dict(d)
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(HaloError, match="malformed JSON"):
        from_hf_config(bad)
    with pytest.raises(HaloError, match="no such file"):
        from_hf_config(tmp_path / "absent.json")


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(HaloError, match="choose one of 8b, 70b, 405b, toy"):
        preset("7b")


def test_layers_range():
    assert preset("405b").with_layers(2).n_layers == 2
    with pytest.raises(HaloError, match="out of range"):
        preset("8b").with_layers(33)
