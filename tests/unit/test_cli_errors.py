"""Bad input: one line naming the problem and the fix, non-zero exit, no partial files."""

import json
import os

import numpy as np


from conftest import halo
from test_config import LLAMA31_8B

TINY = {**LLAMA31_8B, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64}


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def tiny_checkpoint(d, drop=None, reshape=None):
    from safetensors.numpy import save_file

    from halo_mlir.config import from_hf_dict
    from halo_mlir.params.names import hf_name, param_shapes

    tensors = {hf_name(k): np.ones(s, np.float32) for k, s in param_shapes(from_hf_dict(TINY)).items()}
    if drop:
        del tensors[drop]
    if reshape:
        tensors[reshape] = np.ones((3, 3), np.float32)
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(TINY))


def test_unknown_preset(tmp_path):
    out = tmp_path / "x.mlir"
    assert_one_line_error(halo("emit", "--model", "7b", "-o", out, check=False),
                          "unknown preset '7b'", "8b, 70b, 405b, toy")
    assert not out.exists()


def test_malformed_config(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text('{"hidden_size": 12')
    out = tmp_path / "x.mlir"
    assert_one_line_error(halo("emit", "--hf-config", cfg, "-o", out, check=False),
                          "malformed JSON")
    assert os.listdir(tmp_path) == ["config.json"]


def test_unwritable_output(tmp_path):
    out = tmp_path / "no_such_dir" / "x.mlir"
    assert_one_line_error(halo("emit", "--model", "toy", "-o", out, check=False),
                          "cannot write")


def test_missing_tensor(tmp_path):
    tiny_checkpoint(tmp_path, drop="model.layers.1.mlp.up_proj.weight")
    out = tmp_path / "w.irpa"
    assert_one_line_error(
        halo("import-params", "--safetensors", tmp_path, "-o", out, check=False),
        "lacks tensor model.layers.1.mlp.up_proj.weight", "blk.1.ffn_up.weight")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def test_wrong_shape(tmp_path):
    tiny_checkpoint(tmp_path, reshape="model.layers.0.self_attn.k_proj.weight")
    out = tmp_path / "w.irpa"
    assert_one_line_error(
        halo("import-params", "--safetensors", tmp_path, "-o", out, check=False),
        "k_proj.weight has shape [3, 3]", "expects [16, 32]")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def test_truncated_checkpoint(tmp_path):
    tiny_checkpoint(tmp_path)
    st = tmp_path / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    assert_one_line_error(
        halo("import-params", "--safetensors", tmp_path, "-o", tmp_path / "w.irpa", check=False),
        "truncated")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def test_import_writes_every_key(tmp_path):
    import iree.runtime as rt

    tiny_checkpoint(tmp_path)
    out = tmp_path / "w.irpa"
    proc = halo("import-params", "--safetensors", tmp_path / "model.safetensors",
                "--dtype", "f16", "-o", out)
    assert "wrote" in proc.stderr
    index = rt.ParameterIndex()
    index.load(str(out))
    keys = [k for k, _ in index.items()]
    assert "blk.1.ffn_down.weight" in keys and "output.weight" in keys and len(keys) == 21


def test_sharded_checkpoint_index(tmp_path):
    """A checkpoint split over two files with model.safetensors.index.json."""
    import iree.runtime as rt
    from safetensors.numpy import save_file

    from halo_mlir.config import from_hf_dict
    from halo_mlir.params.names import hf_name, param_shapes

    rng = np.random.default_rng(0)
    tensors = {hf_name(k): rng.standard_normal(s).astype(np.float32)
               for k, s in param_shapes(from_hf_dict(TINY)).items()}
    names = sorted(tensors)
    half = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in half.items():
        save_file({n: tensors[n] for n in part}, str(tmp_path / file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in half.items() for n in part}}))
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    out = tmp_path / "w.irpa"
    halo("import-params", "--safetensors", tmp_path, "--dtype", "f32", "-o", out)
    index = rt.ParameterIndex()
    index.load(str(out))
    entries = dict(index.items())
    assert len(entries) == len(tensors)
    got = np.frombuffer(entries["blk.1.attn_k.weight"].file_view, np.float32)
    np.testing.assert_array_equal(got.reshape(16, 32),
                                  tensors["model.layers.1.self_attn.k_proj.weight"])


def test_opt_and_compile_bad_files(tmp_path):
    bad = tmp_path / "bad.mlir"
    bad.write_text("util.func @broken(")
    assert_one_line_error(halo("opt", bad, "--shard", "tp=2", "-o", tmp_path / "o.mlir",
                               check=False), "not valid MLIR")
    assert_one_line_error(halo("opt", tmp_path / "absent.mlir", "-o", tmp_path / "o.mlir",
                               check=False), "cannot read")
    assert_one_line_error(halo("compile", tmp_path / "absent.mlir", "-o", tmp_path / "x.vmfb",
                               check=False), "no such file")
    assert_one_line_error(halo("compile", bad, "--target", "tpu", "-o", tmp_path / "x.vmfb",
                               check=False), "unknown target 'tpu'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.mlir"]
