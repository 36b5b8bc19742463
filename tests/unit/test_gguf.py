"""GGUF import on small files written here: Q/K un-permutation, quantized fields, bad input."""

import os
import subprocess
import sys
from pathlib import Path

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
    for keep in ([], ["--keep-quantized"]):  # (the error alone, without the fallback note)
        assert_one_line_error(halo("import-params", "--gguf", tmp_path / "m.gguf", *keep,
                                   "-o", tmp_path / "m.irpa", check=False),
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


def test_keep_quantized_k_quants(tmp_path):
    """A Q4_K_M-like file (Q4_K, Q6_K, Q8_0 and a Q5_0 fallback): K-quant matrices become
    their fields (unpacked 6-bit scales and mins), which reassemble into gguf's own
    dequantization of the tensor (Q rows un-permuted); the Q5_0 one is dequantized with a
    note on stderr; emit instantiates the K-quant kernels."""
    import kquant_gguf as kq

    from halo_mlir.kernels.quantized import dequantize
    from halo_mlir.quantization.blocks import FORMATS

    path, out = tmp_path / "m.gguf", tmp_path / "m.irpa"
    types = kq.write(path, kq.q4_k_m)
    proc = halo("import-params", "--gguf", path, "--keep-quantized", "--dtype", "f32", "-o", out)
    assert "blk.1.ffn_down.weight (Q5_0)" in proc.stderr and "dequantized" in proc.stderr
    assert "blk.0.ffn_down.weight" not in proc.stderr  # Q8_0: kept
    got, ref = entries(out), kq.dequantized(path)
    assert np.frombuffer(got["blk.1.ffn_down.weight"].file_view, np.float32).size == 256 * 320
    heads = {"attn_q": kq.CFG["heads"], "attn_k": kq.CFG["kv_heads"]}
    seen = set()
    for key, shape in kq.shapes().items():
        fmt = {"Q4_K": "q4_k", "Q6_K": "q6_k"}.get(types.get(key))
        if fmt is None:
            continue
        fields = []
        for field, (fshape, dtype) in FORMATS[fmt].field_shapes(*shape).items():
            raw = got.pop(f"{key}:{field}").file_view
            fields.append(np.frombuffer(raw, {"f16": np.float16, "i8": np.int8}[dtype])
                          .reshape(fshape))
        assert key not in got
        want = ref[key]
        head = heads.get(key.split(".")[-2]) if key.startswith("blk.") else None
        if head:  # llama.cpp's interleaved Q/K rows back to HF order (inverse of permute)
            want = want.reshape(head, -1, 2, shape[1]).swapaxes(1, 2).reshape(shape)
            np.testing.assert_array_equal(permute(want, head), ref[key])
        np.testing.assert_array_equal(dequantize(fmt, fields), want)
        seen.add(fmt)
    assert seen == {"q4_k", "q6_k"}
    sc = np.frombuffer(entries(out)["blk.0.attn_q.weight:sc"].file_view, np.int8)
    assert sc.min() >= 0 and sc.max() <= 63 and len(np.unique(sc)) > 32  # 6-bit, unpacked
    proc = halo("emit", "--gguf", path, "--keep-quantized", "-o", "-")
    assert "note: --keep-quantized" in proc.stderr and "blk.1.ffn_down.weight (Q5_0)" in proc.stderr
    for symbol in ("halo_q4_k_matmul_n256_k256", "halo_q4_k_matmul_n320_k256",
                   "halo_q6_k_matmul_n128_k256", "halo_q6_k_matmul_n40_k256",
                   "halo_q4_k_rows_n40_k256", "halo_q8_0_matmul_n256_k320"):
        assert f"util.func private @{symbol}(" in proc.stdout, symbol
    assert '"model"::"blk.0.attn_q.weight:qs"> : tensor<256x1x4x32xi8>' in proc.stdout
    assert '"model"::"blk.0.attn_v.weight:ql"> : tensor<128x1x2x64xi8>' in proc.stdout
    assert '"model"::"blk.1.ffn_down.weight"> : tensor<256x320xf16>' in proc.stdout


def test_keep_quantized_tp_split_that_cuts_a_block(tmp_path):
    """--tp with kept-quantized weights splits input columns only at block boundaries: with
    hidden 256 (one Q4_K super-block), attn_output cannot split 2 ways: one line naming the
    weight and the fix, from import-params (nothing written) and emit alike; 2 ways at
    hidden 512 is accepted."""
    import kquant_gguf as kq

    path = tmp_path / "m.gguf"
    kq.write(path, kq.Q4_K)
    for cmd in (["import-params", "--gguf", path, "--keep-quantized", "--tp", 2, "-o",
                 tmp_path / "m.irpa"],
                ["emit", "--gguf", path, "--keep-quantized", "--tp", 2, "-o", tmp_path / "m.mlir"]):
        assert_one_line_error(halo(*cmd, check=False), "--tp 2 would cut the Q4_K blocks of "
                              "blk.0.attn_output.weight", "256 input columns are 1 block(s) of 256",
                              "drop --keep-quantized")
    assert os.listdir(tmp_path) == ["m.gguf"]
    kq.write(path, kq.Q4_K, hidden=512)
    proc = halo("emit", "--gguf", path, "--keep-quantized", "--tp", 2, "--bs-prefill", 1,
                "--bs-decode", 1, "-o", tmp_path / "m.mlir")
    assert "4 all-reduces" in proc.stdout + proc.stderr


def test_layer_loop_dequantizes_the_kinds_that_mix_formats(tmp_path):
    """llama.cpp's Q4_K_M gives a weight kind different formats in different layers; one
    loop body takes one format a kind, so under --layer-loop / --layout stacked exactly the
    kinds that mix formats (attn_v, ffn_down: Q4_K and Q6_K; attn_q: Q8_0 and a dequantized
    Q5_0) are dequantized in every layer, with one note; the uniform kinds stay native, and
    the stacked float entry is gguf's dequantization of each layer."""
    import kquant_gguf as kq

    from halo_mlir.params.gguf_file import GgufFile
    from halo_mlir.params.gguf_import import weight_formats

    path, out = tmp_path / "m.gguf", tmp_path / "m.irpa"
    types = kq.write(path, kq.q4_k_m_layers, ffn=512)
    with GgufFile(path) as g:
        per_layer = weight_formats(g, g.config(), True)
        looped = weight_formats(g, g.config(), True, layer_loop=True)
    assert per_layer["blk.0.ffn_down.weight"] == "q6_k" and per_layer["blk.1.ffn_down.weight"] == "q4_k"
    mixed = {"attn_q", "attn_v", "ffn_down"}
    assert set(per_layer) - set(looped) == {f"blk.{i}.{k}.weight" for i in (0, 1) for k in mixed
                                            if types[f"blk.{i}.{k}.weight"] != "Q5_0"}
    assert {k: f for k, f in per_layer.items() if k.split(".")[-2] not in mixed} == looped
    note = ("note: --layer-loop: 3 weight kind(s) mix formats across layers and are "
            "dequantized to f32 in every layer: attn_q.weight (Q8_0 in 1, Q5_0 dequantized in 1); "
            "attn_v.weight (Q4_K in 1, Q6_K in 1); ffn_down.weight (Q6_K in 1, Q4_K in 1)")
    proc = halo("import-params", "--gguf", path, "--keep-quantized", "--dtype", "f32",
                "--layout", "stacked", "-o", out)
    assert note in proc.stderr, proc.stderr
    got, ref = entries(out), kq.dequantized(path)
    v = np.frombuffer(got["blk.attn_v.weight.stacked"].file_view, np.float32).reshape(2, 128, 256)
    for i in (0, 1):  # attn_v rows are not permuted: gguf's dequantization as it is
        np.testing.assert_array_equal(v[i], ref[f"blk.{i}.attn_v.weight"])
    assert "blk.attn_k.weight.stacked:qs" in got and "blk.attn_k.weight.stacked" not in got
    assert not any(k.startswith(("blk.ffn_down.weight.stacked:", "blk.attn_v.weight.stacked:"))
                   for k in got)
    proc = halo("emit", "--gguf", path, "--keep-quantized", "--dtype", "f32", "--layer-loop",
                "-o", "-")
    assert note in proc.stderr and "blk.1.attn_q.weight (Q5_0)" in proc.stderr, proc.stderr
    assert '"model"::"blk.ffn_down.weight.stacked"> : tensor<2x256x512xf32>' in proc.stdout
    assert '"model"::"blk.attn_k.weight.stacked:qs"> : tensor<2x128x1x4x32xi8>' in proc.stdout
    proc = halo("emit", "--gguf", path, "--keep-quantized", "--dtype", "f32", "-o", "-")
    assert "--layer-loop" not in proc.stderr  # unrolled: each layer keeps its format
    assert '"model"::"blk.0.ffn_down.weight:ql"> : tensor<256x2x2x64xi8>' in proc.stdout


def test_generate_tp_errors(tmp_path):
    """generate --tp: a degree that does not divide the model, a split that would cut a
    Q4_K block, --tp with --vmfb: one line each, nothing imported or compiled."""
    import kquant_gguf as kq

    cache = tmp_path / "cache"
    write_gguf(tmp_path / "m.gguf", tokenizer=False)
    kq.write(tmp_path / "k.gguf", kq.Q4_K)
    (tmp_path / "config.json").write_text("{}")
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"hi": 0, "?": 1}, unk_token="?")).save(str(tmp_path / "t.json"))
    env = {"HALO_CACHE_DIR": str(cache)}
    for args, needles in (
            (["--gguf", tmp_path / "m.gguf", "--tokenizer", tmp_path / "t.json", "--tp", 3],
             ["--tp 3 does not divide the kv heads (2)"]),
            (["--gguf", tmp_path / "k.gguf", "--tokenizer", tmp_path / "t.json",
              "--keep-quantized", "--tp", 2],
             ["--tp 2 would cut the Q4_K blocks of blk.0.attn_output.weight"]),
            (["--vmfb", tmp_path / "m.vmfb", "--params", tmp_path / "m.irpa", "--config",
              tmp_path / "config.json", "--tokenizer", tmp_path / "t.json", "--tp", 2],
             ["--tp applies to --gguf", "drop --tp"])):
        proc = subprocess.run([sys.executable, "-m", "halo_mlir", "generate", "--raw", "--prompt",
                               "hi", *map(str, args)], capture_output=True, text=True,
                              env={**os.environ, **env})
        assert_one_line_error(proc, *needles)
    assert not cache.exists() or not any(cache.rglob("*.irpa"))


@pytest.mark.parametrize("device,cpu", [("cpu", True), ("hip", False)])
def test_generate_build_picks_the_cpu_quantized_kernels_on_cpu(tmp_path, monkeypatch, device,
                                                               cpu):
    """`generate`'s build emits, for the CPU (docs/cpu-quantized.md), the decode's Q8_0 /
    Q4_1 matmuls as `{fmt}_matmul_blocks` and the prefill's as `{fmt}_dequant` + a plain
    matmul, and for GPUs the one-reduction `{fmt}_matmul` in both."""
    import halo_mlir.toolchain.compile
    from halo_mlir.inference.generate import build_from_gguf
    from halo_mlir.params.gguf_file import GgufFile

    write_gguf(tmp_path / "m.gguf", qtypes={"blk.0.ffn_up.weight": "Q4_1",
                                            "blk.0.attn_q.weight": "Q8_0"})
    monkeypatch.setenv("HALO_CACHE_DIR", str(tmp_path / "cache"))
    compiled = []
    monkeypatch.setattr(halo_mlir.toolchain.compile, "compile_file",
                        lambda src, out, **kw: compiled.append(Path(src).read_text()))
    with GgufFile(tmp_path / "m.gguf") as g:
        build_from_gguf(g, dtype="f32", keep_quantized=True, device=device, echo=lambda m: None)
    text, = compiled
    for fmt, shape in (("q4_1", "n96_k64"), ("q8_0", "n64_k64")):
        assert (f"util.func private @halo_{fmt}_matmul_blocks_{shape}(" in text) == cpu, fmt
        assert (f"util.func private @halo_{fmt}_dequant_{shape}(" in text) == cpu, fmt
        assert (f"util.func private @halo_{fmt}_matmul_{shape}(" in text) != cpu, fmt
        assert "_lanes16" not in text


@pytest.mark.parametrize("layer_loop", [False, True])
def test_cpu_prefill_dequantizes_per_call_not_at_load(tmp_path, monkeypatch, layer_loop):
    """The CPU program's prefill dequantizes a kept-quantized weight in a dispatch of its own
    at every call, then runs a plain matmul; IREE does not hoist the dequantization into the
    initializer (which would keep an f32 copy of every weight), and the optimization barrier
    that prevents it adds no host wait (read from the program compiled to the stream level).
    With --layer-loop the blocks' weights are slices at the loop index (no barrier there)."""
    import re

    import halo_mlir.toolchain.compile
    from halo_mlir.toolchain.compile import iree_compile_binary, target_flags
    from halo_mlir.inference.generate import build_from_gguf
    from halo_mlir.params.gguf_file import GgufFile

    write_gguf(tmp_path / "m.gguf", qtypes={"blk.0.ffn_up.weight": "Q4_1",
                                            "blk.0.attn_q.weight": "Q8_0"})
    monkeypatch.setenv("HALO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(halo_mlir.toolchain.compile, "compile_file",
                        lambda src, out, **kw: (tmp_path / "m.mlir").write_text(
                            Path(src).read_text()))
    with GgufFile(tmp_path / "m.gguf") as g:
        build_from_gguf(g, dtype="f32", keep_quantized=True, device="cpu", echo=lambda m: None,
                        layer_loop=layer_loop)
    subprocess.run([iree_compile_binary(), *target_flags("cpu"), "--compile-to=stream",
                    str(tmp_path / "m.mlir"), "-o", str(tmp_path / "m.stream.mlir")], check=True)
    text = (tmp_path / "m.stream.mlir").read_text()
    init = text[text.index("util.initializer"):]
    init = init[:init.index("\n  }\n")]
    assert "stream.cmd.parameter.load" in init and "dispatch" not in init
    start = text.index("util.func public @prefill_bs1$async")
    prefill = text[start:text.index("util.func public", start + 1)]
    kernels = re.findall(r"stream\.cmd\.dispatch @\S+::@\S+?_dispatch_\d+_(\w+)", prefill)
    # the two dequantizations (Q8_0 attn_q [128, 64]: [128, 2, 32] as 128x32 of i8 blocks;
    # Q4_1 ffn_up [96, 64]: 192 = 96 x 2 blocks x 2 nibbles x 16) and the plain matmuls
    assert any(k.startswith("elementwise_128x32_f16xi8xf32") for k in kernels), kernels
    assert any(k.startswith("elementwise_broadcast_192x2x16_f16xf16xi8xf32") for k in kernels)
    assert any(k.startswith("matmul_Dx64x64_f32") for k in kernels), kernels
    assert "stream.timepoint.await" not in prefill
    assert ("scf.for" in prefill or "cf.cond_br" in prefill) == layer_loop
