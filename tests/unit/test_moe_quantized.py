"""Kept-quantized mixture-of-experts, without running a model: the expert kernels against
the gguf package's own dequantization, the import of quantized `ffn_*_exps` into stacked
block fields, the TP split check, emission (kernels, shard shapes, determinism) and the
one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

import moeq_gguf as mq
from conftest import halo
from test_cli_errors import assert_one_line_error

SHAPES = {"q8_0": (5, 40, 96), "q4_1": (5, 40, 96), "q4_k": (5, 24, 512), "q6_k": (5, 24, 512)}


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1", "q4_k", "q6_k"])
def test_expert_kernel_matches_gguf(tmp_path, fmt):
    """`{fmt}_expert_matmul` on CPU: each row of x through the expert its id picks, against
    gguf's dequantization of that expert's raw blocks and a float64 matmul (error relative
    to |x| @ |w|^T; every kind of K-quant block: the largest and smallest scales, all-63
    scales, zero blocks). The ids pick every expert, some rows the same one."""
    import gguf
    import iree.runtime as rt

    from halo_mlir.kernels.quantized import expert_weights
    from halo_mlir.kernels.workbench import compile_text, instance
    from halo_mlir.quantization.blocks import FORMATS

    e, n, k = SHAPES[fmt]
    rng = np.random.default_rng(4)
    raw, fields = expert_weights(fmt, e, n, k, rng, kinds=True)
    qtype = gguf.GGMLQuantizationType[FORMATS[fmt].ggml]
    w = np.stack([gguf.quants.dequantize(raw[i], qtype) for i in range(e)]).astype(np.float64)
    ids = np.array([3, 0, 4, 1, 3, 2, 0], np.int64)
    x = rng.standard_normal((len(ids), k)).astype(np.float32)
    inst = instance(f"{fmt}_expert_matmul", {"e": e, "n": n, "k": k}, {"m": len(ids)})
    compile_text(inst.text, tmp_path / "k.vmfb", "cpu")
    config = rt.Config("local-task")
    ctx = rt.SystemContext(config=config)
    ctx.add_vm_module(rt.VmModule.mmap(config.vm_instance, str(tmp_path / "k.vmfb")))
    got = np.array(ctx.modules.module.main(x, ids, *fields).to_host())
    del ctx, config
    want = np.einsum("mk,mnk->mn", x.astype(np.float64), w[ids])
    scale = np.einsum("mk,mnk->mn", np.abs(x).astype(np.float64), np.abs(w[ids]))
    worst = float((np.abs(got - want) / np.maximum(scale, 1e-30)).max())
    print(f"{fmt}_expert_matmul [e={e}, n={n}, k={k}] at m={len(ids)}: "
          f"max |error| / (|x| @ |w|^T) = {worst:.3g}")
    assert np.isfinite(got).all() and worst < 1e-5


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    d = tmp_path_factory.mktemp("moeq")
    types = mq.write(d / "mixed.gguf", mq.MIXED)
    return d / "mixed.gguf", types


def test_import_keeps_experts_quantized(mixed, tmp_path):
    """import-params --keep-quantized: each quantized expert stack becomes its block fields
    [experts, rows, cols / block, ...] (docs/ABI.md), which read back with `dequantize` equal
    gguf's dequantization of the stored tensor bit for bit; the router stays f32; the same
    file imported with --layout stacked holds [layers, experts, ...] fields."""
    import gguf
    from iree import runtime as rt

    from halo_mlir.kernels.quantized import dequantize
    from halo_mlir.params.gguf_file import GgufFile
    from halo_mlir.quantization.blocks import FORMATS

    path, types = mixed
    out = tmp_path / "q.irpa"
    halo("import-params", "--gguf", path, "--keep-quantized", "--dtype", "f32", "-o", out)
    idx = rt.ParameterIndex()
    idx.load(str(out))
    entries = dict(idx.items())
    assert "blk.0.ffn_gate_inp.weight" in entries and "blk.0.ffn_gate_exps.weight" not in entries
    r = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in r.tensors}
    with GgufFile(path) as g:
        for key, t in types.items():
            fmt = FORMATS[t.lower()]
            e, n, k = g.shape(key)
            fields = []
            for field, (dtype, tail) in fmt.fields.items():
                data = np.frombuffer(entries[f"{key}:{field}"].file_view, dtype)
                fields.append(data.reshape(e, n, k // fmt.block, *tail))
            want = gguf.quants.dequantize(tensors[key].data, tensors[key].tensor_type)
            got = np.stack([dequantize(fmt.name, [f[i] for f in fields]) for i in range(e)])
            np.testing.assert_array_equal(got, want.reshape(e, n, k))
    uniform = tmp_path / "u.gguf"
    mq.write(uniform, mq.UNIFORM)
    stacked = tmp_path / "s.irpa"
    halo("import-params", "--gguf", uniform, "--keep-quantized", "--layout", "stacked",
         "--dtype", "f32", "-o", stacked)
    idx = rt.ParameterIndex()
    idx.load(str(stacked))
    sizes = {k: len(memoryview(e.file_view)) for k, e in idx.items()}
    # [layers, experts, rows, blocks, ...]: Q4_K gate [2, 4, 512, 1, 4, 32], Q8_0 up
    # [2, 4, 512, 8, 32], Q4_K down's scales [2, 4, 256, 2, 8]
    assert sizes["blk.ffn_gate_exps.weight.stacked:qs"] == mq.L * mq.E * mq.F * 128
    assert sizes["blk.ffn_up_exps.weight.stacked:qs"] == mq.L * mq.E * mq.F * mq.D
    assert sizes["blk.ffn_down_exps.weight.stacked:sc"] == mq.L * mq.E * mq.D * 2 * 8


def test_emit_runs_the_expert_kernels(mixed, tmp_path):
    """emit --keep-quantized: the decode form calls each layer's expert kernels, the grouped
    prefill the dense kernels on each expert's slice; the router is a float matmul;
    deterministic; --tp 2 reads `KEY:FIELD.shard.i` at local sizes (gate/up rows, down's
    blocks)."""
    path, _ = mixed
    a, b = tmp_path / "a.mlir", tmp_path / "b.mlir"
    for out in (a, b):
        halo("emit", "--gguf", path, "--keep-quantized", "--dtype", "f32", "-o", out)
    assert a.read_bytes() == b.read_bytes()
    text = a.read_text()
    for sym in ("halo_q8_0_expert_matmul_e4_n512_k256", "halo_q4_k_expert_matmul_e4_n512_k256",
                "halo_q4_1_expert_matmul_e4_n256_k512", "halo_q6_k_expert_matmul_e4_n512_k256",
                "halo_q4_k_expert_matmul_e4_n256_k512", "halo_q8_0_matmul_n512_k256",
                "halo_q4_1_matmul_n256_k512", "halo_q4_k_matmul_n256_k512"):
        assert f"util.func private @{sym}(" in text, sym
    assert '"model"::"blk.0.ffn_gate_exps.weight:qs"> : tensor<4x512x8x32xi8>' in text
    assert '"model"::"blk.1.ffn_down_exps.weight:qs"> : tensor<4x256x2x4x32xi8>' in text
    assert '"model"::"blk.0.ffn_gate_inp.weight"> : tensor<4x256xf32>' in text
    tp2 = tmp_path / "tp2.mlir"
    halo("emit", "--gguf", path, "--keep-quantized", "--dtype", "f32", "--tp", 2, "-o", tp2)
    text = tp2.read_text()
    for i in (0, 1):
        assert f'"blk.0.ffn_gate_exps.weight:qs.shard.{i}"> : tensor<4x256x8x32xi8>' in text
        assert f'"blk.1.ffn_down_exps.weight:qs.shard.{i}"> : tensor<4x256x1x4x32xi8>' in text
        assert f'"blk.1.ffn_down_exps.weight:d.shard.{i}"> : tensor<4x256x1xf16>' in text


def test_split_that_cuts_expert_blocks_is_an_error():
    """A column split of an expert stack must fall on block boundaries, as for a dense
    weight: ffn_down_exps with 512 input columns is 2 Q4_K super-blocks, not 4."""
    from halo_mlir.errors import HaloError
    from halo_mlir.sharding_passes.plan import check_quantized_split

    shapes = {"blk.0.ffn_down_exps.weight": (4, 256, 512), "blk.0.ffn_up_exps.weight": (4, 512, 256)}
    check_quantized_split({k: "q4_k" for k in shapes}, shapes, 2)  # 2 blocks, 2 ways
    with pytest.raises(HaloError, match=r"--tp 4 would cut the Q4_K blocks of "
                       r"blk\.0\.ffn_down_exps\.weight: its 512 input columns are 2 block"):
        check_quantized_split({k: "q4_k" for k in shapes}, shapes, 4)


def test_one_line_errors(mixed, tmp_path):
    """--layer-loop with a different expert format per layer stops with one line and
    writes nothing."""
    path, _ = mixed
    out = tmp_path / "x.mlir"
    proc = halo("emit", "--gguf", path, "--keep-quantized", "--layer-loop", "-o", out,
                check=False)
    assert_one_line_error(proc, "--layer-loop needs every layer's ffn_gate_exps weight in one "
                          "format")
    assert not out.exists()


def test_mixtral_fp8_import_and_emit(tmp_path):
    """import-params --quantize fp8 of a Mixtral safetensors checkpoint: each expert stack
    is `KEY:qs` f8E4M3FNUZ [experts, out, in], expert e quantized with its own scale
    `KEY:d`[e] = amax(expert e) / 240 (checked against the HF per-expert tensors with
    ml_dtypes' rounding), one input scale `q_input:rscale` per stack, the router in floats;
    emit --dtype fp8 reads exactly those (unrolled and, from a stacked import, as a loop)."""
    import ml_dtypes
    from test_layout import entries
    import test_moe

    # expert ffn 32: the fp8 matmul of the grouped prefill takes whole 32-column blocks
    tensors = test_moe._tiny_checkpoint(tmp_path, hf={**test_moe.TINY, "intermediate_size": 32})
    out = tmp_path / "f8.irpa"
    halo("import-params", "--safetensors", tmp_path, "--quantize", "fp8", "-o", out)
    raw = entries(out)
    fp8 = ml_dtypes.float8_e4m3fnuz
    for key, kind in (("ffn_gate_exps", "w1"), ("ffn_up_exps", "w3"), ("ffn_down_exps", "w2")):
        want = np.stack([tensors[f"model.layers.1.block_sparse_moe.experts.{e}.{kind}.weight"]
                         for e in range(3)])
        d = raw[f"blk.1.{key}.weight:d"].view(np.float32)
        np.testing.assert_array_equal(d, (np.abs(want).max(axis=(1, 2)) / 240).astype(np.float32))
        qs = raw[f"blk.1.{key}.weight:qs"].view(np.uint8).view(fp8).reshape(want.shape)
        np.testing.assert_array_equal(qs.astype(np.float32), np.clip(
            want / d[:, None, None], -240, 240).astype(fp8).astype(np.float32))
        assert raw[f"blk.1.{key}.q_input:rscale"].view(np.float32).shape == (1,)
    assert raw["blk.0.ffn_gate_inp.weight"].view(np.float16).size == 3 * 32
    mlir = tmp_path / "f8.mlir"
    halo("emit", "--hf-config", tmp_path / "config.json", "--dtype", "fp8", "-o", mlir)
    text = mlir.read_text()
    assert '"model"::"blk.1.ffn_down_exps.weight:qs"> : tensor<3x32x32xf8E4M3FNUZ>' in text
    assert '"model"::"blk.1.ffn_down_exps.weight:d"> : tensor<3xf32>' in text
    assert '"model"::"blk.1.ffn_down_exps.q_input:rscale"> : tensor<f32>' in text
    assert '"model"::"blk.1.ffn_gate_inp.weight"> : tensor<3x32xf16>' in text
    halo("emit", "--hf-config", tmp_path / "config.json", "--dtype", "fp8", "--layer-loop",
         "-o", tmp_path / "loop.mlir")
    loop = (tmp_path / "loop.mlir").read_text()
    assert '"model"::"blk.ffn_up_exps.weight.stacked:d"> : tensor<2x3xf32>' in loop
    # per-channel: each expert's rows their own scale, `KEY:d_rows` [experts, out]
    pc = tmp_path / "pc.irpa"
    halo("import-params", "--safetensors", tmp_path, "--quantize", "fp8", "--fp8-scales",
         "per-channel", "-o", pc)
    raw = entries(pc)
    want = np.stack([tensors[f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight"]
                     for e in range(3)])
    d = raw["blk.0.ffn_down_exps.weight:d_rows"].view(np.float32).reshape(3, 32)
    np.testing.assert_array_equal(d, (np.abs(want).max(axis=2) / 240).astype(np.float32))
    qs = raw["blk.0.ffn_down_exps.weight:qs"].view(np.uint8).view(fp8).reshape(want.shape)
    np.testing.assert_array_equal(qs.astype(np.float32), np.clip(
        want / d[:, :, None], -240, 240).astype(fp8).astype(np.float32))
    halo("emit", "--hf-config", tmp_path / "config.json", "--dtype", "fp8", "--fp8-scales",
         "per-channel", "-o", tmp_path / "pc.mlir")
    assert '"model"::"blk.0.ffn_down_exps.weight:d_rows"> : tensor<3x32xf32>' in \
        (tmp_path / "pc.mlir").read_text()


@pytest.mark.parametrize("args,what", [(["--keep-quantized"], "kept-quantized"),
                                       (["--dtype", "fp8"], "fp8")])
def test_expert_parallel_refuses_quantized_experts(mixed, tmp_path, args, what):
    """Expert parallelism runs float experts only: one line naming the mode that works."""
    path, _ = mixed
    out = tmp_path / "x.mlir"
    proc = halo("emit", "--gguf", path, *args, "--tp", 2, "--moe-parallel", "expert",
                "-o", out, check=False)
    assert_one_line_error(proc, f"--moe-parallel expert does not run {what} experts yet",
                          "--moe-parallel ffn")
    assert not out.exists()
