"""`halo-mlir export-shortfin` on bad input: one line `error: ...`, exit 1, nothing written
(no DIR, no temporary directory left beside it). Checks run before any compile."""

from __future__ import annotations

import json

import pytest

from conftest import halo

CONFIG = dict(vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
              num_attention_heads=6, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
              max_position_embeddings=512, rope_theta=10000.0, architectures=["LlamaForCausalLM"],
              model_type="llama")


@pytest.fixture
def model(tmp_path):
    """config.json + tokenizer.json + tokenizer_config.json + an f32 model.irpa holding
    output_norm.weight (enough for the checks; nothing here compiles)."""
    import iree.runtime as rt
    import numpy as np
    from tokenizers import Tokenizer, models

    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token="a")).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    rt.save_archive_file({"output_norm.weight": np.ones(96, np.float32)}, str(d / "model.irpa"))
    return d


def export(model, out, *extra):
    return halo("export-shortfin", "--hf-config", model / "config.json", "--params",
                model / "model.irpa", "--out", out, *extra, check=False)


def assert_error(proc, message: str, parent, out_existed: bool = False):
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert message in lines[0], lines[0]
    assert not [p for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.mark.iree39
def test_non_empty_dir_needs_force(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = export(model, out)
    assert_error(proc, "is not empty; pass --force to replace its contents", tmp_path)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.iree39
@pytest.mark.parametrize("extra, message", [
    (["--bs", "1,512"], "batch size 512 exceeds the 256 KV-cache pages"),
    (["--tp", "2"], "--tp 2 with --target cpu cannot be served"),
    (["--dtype", "f16"], "holds f32 parameters but --dtype is f16; pass --dtype f32"),
    (["--tp", "4", "--target", "gfx942", "--dtype", "f32"], "--tp 4 does not divide"),
])
def test_models_shortfin_cannot_serve(model, tmp_path, extra, message):
    out = tmp_path / "out"
    if "--tp" in extra and extra[extra.index("--tp") + 1] != "1":  # rank files must exist
        import shutil

        n = int(extra[extra.index("--tp") + 1])
        for i in range(n):
            shutil.copy(model / "model.irpa", model / f"model.rank{i}.irpa")
    proc = export(model, out, *extra)
    assert_error(proc, message, tmp_path)
    assert not out.exists()


@pytest.mark.iree39
def test_missing_inputs(model, tmp_path):
    out = tmp_path / "out"
    proc = halo("export-shortfin", "--hf-config", model / "config.json", "--out", out,
                check=False)
    assert_error(proc, "--hf-config needs --params", tmp_path)
    (model / "tokenizer_config.json").write_text("{}")
    proc = export(model, out)
    assert_error(proc, "no eos_token in the tokenizer_config.json", tmp_path)
    assert not out.exists()


def test_release_without_a_shortfin_is_refused(model, tmp_path):
    """Under IREE 3.13 (no shortfin release loads its modules): refused before writing."""
    from halo_mlir.toolchain import compat

    if compat.current().shortfin is not None:
        pytest.skip("the installed IREE release has a shortfin")
    out = tmp_path / "out"
    proc = export(model, out)
    assert_error(proc, "compiles modules that no shortfin release loads", tmp_path)
    assert "pip install 'halo-mlir[shortfin]'" in proc.stderr
    assert not out.exists()
