"""Parameter layouts: `import-params --layout stacked` writes one `blk.NAME.stacked` entry
per weight kind ([layers, ...], layer i = the per-layer file's `blk.i.NAME`), also as TP
rank files, and `--layer-loop` modules read exactly those names."""

import json

import numpy as np

from conftest import halo
from test_cli_errors import TINY


def checkpoint(d):
    """TINY with distinct random values in every tensor."""
    from safetensors.numpy import save_file

    from halo_mlir.config import from_hf_dict
    from halo_mlir.params.names import hf_name, param_shapes

    rng = np.random.default_rng(0)
    tensors = {hf_name(k): rng.standard_normal(s).astype(np.float32)
               for k, s in param_shapes(from_hf_dict(TINY)).items()}
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(TINY))


def entries(path) -> dict[str, np.ndarray]:
    """Every entry of an IRPA as float32 values (the import wrote f32)."""
    import iree.runtime as rt

    index = rt.ParameterIndex()
    index.load(str(path))
    out = {}
    for key, e in index.items():
        view = np.frombuffer(memoryview(e.file_view), dtype=np.float32)
        out[key] = view.copy()
    return out


def test_stacked_entries_equal_the_per_layer_ones(tmp_path):
    from halo_mlir.config import from_hf_dict
    from halo_mlir.params.names import block_shapes

    checkpoint(tmp_path)
    for layout in ("per-layer", "stacked"):
        halo("import-params", "--safetensors", tmp_path, "--dtype", "f32", "--layout", layout,
             "-o", tmp_path / f"{layout}.irpa")
    layers, stacked = entries(tmp_path / "per-layer.irpa"), entries(tmp_path / "stacked.irpa")
    cfg = from_hf_dict(TINY)
    kinds = [k.split(".")[2] for k in block_shapes(cfg)]
    assert sorted(stacked) == sorted([f"blk.{kind}.weight.stacked" for kind in kinds] +
                                     ["token_embd.weight", "output_norm.weight", "output.weight"])
    for kind in kinds:
        want = np.concatenate([layers[f"blk.{i}.{kind}.weight"] for i in range(cfg.n_layers)])
        assert np.array_equal(stacked[f"blk.{kind}.weight.stacked"], want), kind
    assert np.array_equal(stacked["output.weight"], layers["output.weight"])


def test_stacked_rank_files_hold_each_layers_shard(tmp_path):
    from halo_mlir.config import from_hf_dict

    checkpoint(tmp_path)
    halo("import-params", "--safetensors", tmp_path, "--dtype", "f32", "-o", tmp_path / "w.irpa")
    halo("import-params", "--safetensors", tmp_path, "--dtype", "f32", "--layout", "stacked",
         "--tp", 2, "-o", tmp_path / "s.irpa")
    whole = entries(tmp_path / "w.irpa")
    ranks = [entries(tmp_path / f"s.rank{i}.irpa") for i in range(2)]
    cfg = from_hf_dict(TINY)
    q_rows = cfg.n_heads * cfg.head_dim  # attn_q splits by output rows
    for i in range(2):
        got = ranks[i][f"blk.attn_q.weight.stacked.shard.{i}"]
        want = np.concatenate([whole[f"blk.{n}.attn_q.weight"].reshape(q_rows, -1)
                               [i * q_rows // 2:(i + 1) * q_rows // 2]
                               for n in range(cfg.n_layers)])
        assert np.array_equal(got, want.reshape(-1))
        down = whole["blk.1.ffn_down.weight"].reshape(cfg.hidden_size, -1)  # by input columns
        got_down = ranks[i][f"blk.ffn_down.weight.stacked.shard.{i}"].reshape(
            cfg.n_layers, cfg.hidden_size, -1)[1]
        assert np.array_equal(got_down, np.split(down, 2, axis=1)[i])
    assert "blk.attn_norm.weight.stacked" in ranks[0]  # replicated: once, in rank 0


def test_layer_loop_reads_stacked_names(tmp_path):
    checkpoint(tmp_path)
    halo("emit", "--hf-config", tmp_path / "config.json", "--layer-loop", "-o", tmp_path / "m.mlir")
    text = (tmp_path / "m.mlir").read_text()
    assert '"model"::"blk.attn_q.weight.stacked"> : tensor<2x' in text
    assert "blk.0." not in text and "scf.for" in text


def test_unknown_layout_is_rejected(tmp_path):
    checkpoint(tmp_path)
    proc = halo("import-params", "--safetensors", tmp_path, "--layout", "rows", "-o",
                tmp_path / "w.irpa", check=False)
    assert proc.returncode != 0 and "rows" in proc.stderr
    assert not (tmp_path / "w.irpa").exists()
