"""GGUF import on small files written here: Q/K un-permutation, quantized fields, bad input."""

import os

import numpy as np
import pytest

from conftest import halo
from test_cli_errors import assert_one_line_error

CFG = dict(hidden=64, layers=1, heads=4, kv_heads=2, ffn=96, vocab=40)


def permute(w, heads):  # what llama.cpp's converter does to HF Q/K rows
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, arch="llama", tokenizer=True, qtypes=None, seed=0):
    """A tiny llama GGUF; returns the HF-order float weights. qtypes: {name: GGML type}."""
    import gguf

    rng = np.random.default_rng(seed)
    d, f, v, hd = CFG["hidden"], CFG["ffn"], CFG["vocab"], CFG["hidden"] // CFG["heads"]
    shapes = {"token_embd.weight": (v, d), "output_norm.weight": (d,), "output.weight": (v, d),
              "blk.0.attn_norm.weight": (d,), "blk.0.ffn_norm.weight": (d,),
              "blk.0.attn_q.weight": (d, d), "blk.0.attn_k.weight": (CFG["kv_heads"] * hd, d),
              "blk.0.attn_v.weight": (CFG["kv_heads"] * hd, d),
              "blk.0.attn_output.weight": (d, d), "blk.0.ffn_gate.weight": (f, d),
              "blk.0.ffn_up.weight": (f, d), "blk.0.ffn_down.weight": (d, f)}
    hf = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(CFG["layers"])
    w.add_embedding_length(d)
    w.add_feed_forward_length(f)
    w.add_head_count(CFG["heads"])
    w.add_head_count_kv(CFG["kv_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_context_length(256)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"t{i}" for i in range(v)])
        w.add_token_merges(["t 1"])
        w.add_eos_token_id(1)
    for name, array in hf.items():
        stored = permute(array, CFG["heads"] if "attn_q" in name else CFG["kv_heads"]) \
            if ("attn_q" in name or "attn_k" in name) else array
        qtype = (qtypes or {}).get(name)
        if qtype is None:
            w.add_tensor(name, stored)
        elif qtype in ("Q8_0", "Q4_1"):
            t = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, gguf.quants.quantize(stored, t), raw_dtype=t)
        else:  # raw zero blocks of a type nothing can decode
            t = gguf.GGMLQuantizationType[qtype]
            block, size = gguf.GGML_QUANT_SIZES[t]
            w.add_tensor(name, np.zeros((stored.shape[0], stored.shape[1] // block * size),
                                        np.uint8), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def entries(path):
    import iree.runtime as rt

    index = rt.ParameterIndex()
    index.load(str(path))
    return {k: e for k, e in index.items()}


def test_float_gguf_imports_in_hf_order(tmp_path):
    hf = write_gguf(tmp_path / "m.gguf")
    out = tmp_path / "m.irpa"
    halo("import-params", "--gguf", tmp_path / "m.gguf", "--dtype", "f32", "-o", out)
    got = entries(out)
    for key in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_down.weight"):
        array = np.frombuffer(got[key].file_view, np.float32).reshape(hf[key].shape)
        np.testing.assert_array_equal(array, hf[key])  # Q/K un-permuted back to HF order


def test_keep_quantized_splits_block_fields(tmp_path):
    import gguf

    hf = write_gguf(tmp_path / "m.gguf", qtypes={"blk.0.ffn_up.weight": "Q4_1",
                                                 "blk.0.attn_q.weight": "Q8_0"})
    out = tmp_path / "m.irpa"
    halo("import-params", "--gguf", tmp_path / "m.gguf", "--keep-quantized", "-o", out)
    got = entries(out)
    assert {"blk.0.ffn_up.weight:d", "blk.0.ffn_up.weight:m", "blk.0.ffn_up.weight:qs",
            "blk.0.attn_q.weight:d", "blk.0.attn_q.weight:qs"} <= set(got)
    assert "blk.0.ffn_up.weight" not in got and "blk.0.ffn_gate.weight" in got
    # Q4_1 fields reassemble into gguf's own dequantization of the same weight.
    d = np.frombuffer(got["blk.0.ffn_up.weight:d"].file_view, np.float16).reshape(96, 2)
    m = np.frombuffer(got["blk.0.ffn_up.weight:m"].file_view, np.float16).reshape(96, 2)
    qs = np.frombuffer(got["blk.0.ffn_up.weight:qs"].file_view, np.uint8).reshape(96, 2, 16)
    q = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.float32)
    ours = (q * d[..., None].astype(np.float32) + m[..., None].astype(np.float32)).reshape(96, 64)
    ref = gguf.quants.dequantize(gguf.quants.quantize(hf["blk.0.ffn_up.weight"],
                                                      gguf.GGMLQuantizationType.Q4_1),
                                 gguf.GGMLQuantizationType.Q4_1)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    # Q8_0 Q rows are un-permuted like float ones: dequantized, they match HF order.
    d8 = np.frombuffer(got["blk.0.attn_q.weight:d"].file_view, np.float16).reshape(64, 2)
    q8 = np.frombuffer(got["blk.0.attn_q.weight:qs"].file_view, np.int8).reshape(64, 2, 32)
    deq = (q8 * d8[..., None].astype(np.float32)).reshape(64, 64)
    np.testing.assert_allclose(deq, hf["blk.0.attn_q.weight"], atol=0.05)


def test_emit_reads_hyperparameters_from_gguf(tmp_path):
    write_gguf(tmp_path / "m.gguf", qtypes={"blk.0.ffn_up.weight": "Q4_1"})
    proc = halo("emit", "--gguf", tmp_path / "m.gguf", "--keep-quantized", "-o", "-")
    assert "tensor<40x64xf16>" in proc.stdout  # token_embd from vocab 40, hidden 64
    assert "util.func private @halo_q4_1_matmul_n96_k64" in proc.stdout
    assert '"model"::"blk.0.ffn_up.weight:qs"> : tensor<96x2x16xi8>' in proc.stdout


def test_truncated_gguf(tmp_path):
    write_gguf(tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "m.gguf").write_bytes(data[: len(data) - 500])
    out = tmp_path / "m.irpa"
    assert_one_line_error(halo("import-params", "--gguf", tmp_path / "m.gguf", "-o", out,
                               check=False), "truncated")
    assert not out.exists() and os.listdir(tmp_path) == ["m.gguf"]


def test_unsupported_quant_type(tmp_path):
    write_gguf(tmp_path / "m.gguf", qtypes={"blk.0.ffn_up.weight": "Q8_1"})
    assert_one_line_error(halo("import-params", "--gguf", tmp_path / "m.gguf", "-o",
                               tmp_path / "m.irpa", check=False),
                          "blk.0.ffn_up.weight", "Q8_1", "cannot be dequantized")
    assert os.listdir(tmp_path) == ["m.gguf"]


def test_non_llama_architecture(tmp_path):
    write_gguf(tmp_path / "m.gguf", arch="gpt2")
    assert_one_line_error(halo("import-params", "--gguf", tmp_path / "m.gguf", "-o",
                               tmp_path / "m.irpa", check=False), "architecture 'gpt2'")
    assert_one_line_error(halo("emit", "--gguf", tmp_path / "m.gguf", "-o", tmp_path / "x.mlir",
                               check=False), "architecture 'gpt2'")
    assert os.listdir(tmp_path) == ["m.gguf"]


def test_missing_tokenizer(tmp_path):
    write_gguf(tmp_path / "m.gguf", tokenizer=False)
    assert_one_line_error(halo("generate", "--gguf", tmp_path / "m.gguf", "--prompt", "hi",
                               check=False), "has no tokenizer")


@pytest.mark.parametrize("args,needle", [
    (["--keep-quantized", "--safetensors", "x"], "--keep-quantized applies to --gguf"),
    ([], "exactly one of --safetensors and --gguf"),
])
def test_import_flag_errors(tmp_path, args, needle):
    assert_one_line_error(halo("import-params", *args, "-o", tmp_path / "m.irpa", check=False),
                          needle)
