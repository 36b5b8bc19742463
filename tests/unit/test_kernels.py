"""Each templated kernel compiled alone for CPU and run on random inputs: the quantized ones
against the gguf package's own dequantization, every registered kernel against the numpy
reference beside its registry entry (what `halo-mlir kernel check` runs); parameter,
constraint and template errors; the workbench CLI."""

import numpy as np
import pytest

N, M = 48, 5
K = {"q8_0": 96, "q4_1": 96, "q4_k": 768, "q6_k": 768}  # a whole number of blocks


def quantized(fmt, rng):
    """gguf's own dequantization and our fields of one weight [N, K[fmt]]: Q8_0/Q4_1
    quantized by gguf; Q4_K/Q6_K random super-blocks (gguf cannot quantize them) of every
    kind: random, largest and smallest d/dmin, all 6-bit scales/mins 63, all zero."""
    import gguf

    from halo_mlir.kernels.quantized import random_blocks
    from halo_mlir.quantization.blocks import FORMATS

    raw = random_blocks(fmt, N, K[fmt], rng)
    t = gguf.GGMLQuantizationType[FORMATS[fmt].ggml]
    return gguf.quants.dequantize(raw, t), FORMATS[fmt].split(raw, N, K[fmt])


def run_kernel(tmp_path, kernel, fields, first, first_type, out_shape, k, **extra):
    import iree.runtime as rt

    from halo_mlir import kernels
    from halo_mlir.toolchain.compile import compile_file
    from halo_mlir.ir_builder import Builder

    b = Builder()
    with b.context, b.at("test"):
        module = b.new_module()
        types = [b.tensor_type(*first_type)] + [
            b.tensor_type(a.shape, {np.float16: "f16", np.int8: "i8"}[a.dtype.type])
            for a in fields.values()]
        symbol = kernels.instantiate(b, kernel, n=N, k=k, **extra)
        b.define("main", types, lambda *args: b.call(
            symbol, list(args), [b.tensor_type(out_shape, "f32")])[0])
        (tmp_path / "k.mlir").write_text(str(module))
    compile_file(tmp_path / "k.mlir", tmp_path / "k.vmfb", target="cpu", echo=lambda m: None)
    config = rt.Config("local-task")
    ctx = rt.SystemContext(config=config)
    ctx.add_vm_module(rt.VmModule.mmap(config.vm_instance, str(tmp_path / "k.vmfb")))
    return np.asarray(ctx.modules.module.main(first, *fields.values()).to_host())


@pytest.mark.parametrize("fmt,form", [("q8_0", 0), ("q8_0", 16), ("q8_0", "blocks"),
                                      ("q4_1", 0), ("q4_1", 16), ("q4_1", "blocks"),
                                      ("q4_k", 0), ("q4_k", "blocks"), ("q6_k", 0)])
@pytest.mark.parametrize("m", [M, 1])
def test_quantized_matmul_matches_numpy(tmp_path, fmt, form, m):
    """Against gguf's dequantization + a float64 matmul, within f32 accumulation: the
    error bound is relative to |x| @ |w|^T (the K-quant blocks span f16's whole range).
    form: `lanes` of `{fmt}_matmul` (0, 16) or the CPU decode kernel `{fmt}_matmul_blocks`;
    m = 1 is the decode's shape (a static unit row count after inlining)."""
    rng = np.random.default_rng(0)
    w, fields = quantized(fmt, rng)
    x = rng.standard_normal((m, K[fmt])).astype(np.float32)
    kernel = f"{fmt}_matmul_blocks" if form == "blocks" else f"{fmt}_matmul"
    got = run_kernel(tmp_path, kernel, fields, x, ([None, K[fmt]], "f32"), [None, N],
                     K[fmt], **({"lanes": form} if form in (16,) else {}))
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    scale = np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64)
    worst = float((np.abs(got - want) / np.maximum(scale, 1e-30)).max())
    print(f"{kernel} form={form} m={m}: max |error| / (|x| @ |w|^T) = {worst:.3g}")
    assert got.shape == (m, N) and np.isfinite(got).all() and worst < 1e-5


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1", "q4_k", "q6_k"])
def test_quantized_dequant_matches_gguf(tmp_path, fmt):
    """`{fmt}_dequant` (the CPU prefill's weight) equals gguf's own dequantization bit for
    bit, on blocks of every kind (for the K-quants: the largest and smallest d, all scales
    63, all zero)."""
    import iree.runtime as rt

    from halo_mlir import kernels
    from halo_mlir.toolchain.compile import compile_file
    from halo_mlir.ir_builder import Builder

    w, fields = quantized(fmt, np.random.default_rng(2))
    b = Builder()
    with b.context, b.at("test"):
        module = b.new_module()
        types = [b.tensor_type(a.shape, {np.float16: "f16", np.int8: "i8"}[a.dtype.type])
                 for a in fields.values()]
        symbol = kernels.instantiate(b, f"{fmt}_dequant", n=N, k=K[fmt])
        b.define("main", types, lambda *args: b.call(
            symbol, list(args), [b.tensor_type([N, K[fmt]], "f32")])[0])
        (tmp_path / "k.mlir").write_text(str(module))
    compile_file(tmp_path / "k.mlir", tmp_path / "k.vmfb", target="cpu", echo=lambda m: None)
    config = rt.Config("local-task")
    ctx = rt.SystemContext(config=config)
    ctx.add_vm_module(rt.VmModule.mmap(config.vm_instance, str(tmp_path / "k.vmfb")))
    got = np.asarray(ctx.modules.module.main(*fields.values()).to_host())
    np.testing.assert_array_equal(got, w.astype(np.float32))


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1", "q4_k", "q6_k"])
def test_quantized_rows_match_numpy(tmp_path, fmt):
    rng = np.random.default_rng(1)
    w, fields = quantized(fmt, rng)
    ids = np.array([3, 0, 47, 3, 12], np.int64)
    got = run_kernel(tmp_path, f"{fmt}_rows", fields, ids, ([None], "i64"), [None, K[fmt]],
                     K[fmt])
    np.testing.assert_array_equal(got, w[ids])


def test_k_quant_blocks_cover_every_scale_pattern():
    """The random super-blocks the kernel tests use hold every 6-bit scale and min value
    (Q4_K) and every int8 scale (Q6_K), and every kind of block: our unpacked fields equal
    gguf's dequantization bit for bit."""
    import gguf

    from halo_mlir.kernels.quantized import dequantize, random_blocks
    from halo_mlir.quantization.blocks import FORMATS

    rng = np.random.default_rng(2)
    for fmt, values in (("q4_k", 64), ("q6_k", 256)):
        raw = random_blocks(fmt, 64, 1024, rng)
        fields = FORMATS[fmt].split(raw, 64, 1024)
        scales = [fields["sc"], fields["m"]] if fmt == "q4_k" else [fields["sc"]]
        for sc in scales:
            assert len(np.unique(sc)) == values, (fmt, len(np.unique(sc)))
        d = fields["d"].astype(np.float32)
        assert d.max() == 65504.0 and (d == 2.0 ** -24).any() and (d == 0).any()
        want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[FORMATS[fmt].ggml])
        np.testing.assert_array_equal(dequantize(fmt, list(fields.values())), want)


def test_kernel_parameter_errors():
    from halo_mlir.errors import HaloError
    from halo_mlir.kernels import KERNELS, kernel, render

    with pytest.raises(HaloError, match="k=40 must be a positive multiple of 32"):
        render(KERNELS["q4_1_matmul"], {"n": 8, "k": 40})
    with pytest.raises(HaloError, match="unknown parameter 'z'"):
        render(KERNELS["q4_1_matmul"], {"n": 8, "k": 32, "z": 1})
    for fmt in ("q4_k", "q6_k"):  # super-blocks of 256
        with pytest.raises(HaloError, match="k=96 must be a positive multiple of 256"):
            render(KERNELS[f"{fmt}_matmul"], {"n": 8, "k": 96})
    with pytest.raises(HaloError, match="unknown kernel 'q5_matmul'"):
        kernel("q5_matmul")


# ---- every registered kernel against its numpy reference (the workbench's `check`) ----
CHECKS = [
    ("paged_decode_attention", {"dtype": "f32"}),
    ("paged_decode_attention", {"dtype": "f16", "head_dim": 128, "group": 4, "stride": 32}),
    ("paged_decode_attention", {"dtype": "bf16", "batch": 1, "kv_heads": 3, "stride": 8}),
    ("paged_decode_attention_fp8", {"dtype": "f16"}),
    ("paged_decode_attention_fp8", {"dtype": "f32", "head_dim": 128, "group": 4}),
    ("paged_prefill_attention", {"dtype": "f32", "batch": 2}),
    ("paged_prefill_attention", {"dtype": "f16", "group": 4, "head_dim": 32, "stride": 8}),
    ("paged_prefill_attention", {"dtype": "bf16", "batch": 2, "kv_heads": 1}),
    ("fp8_matmul", {"out_dtype": "f32"}),
    ("fp8_matmul", {"out_dtype": "f16", "n": 48, "k": 256}),
    ("fp8_matmul", {"out_dtype": "bf16"}),
    ("fp8_matmul_rows", {"out_dtype": "f32"}),
    ("fp8_matmul_rows", {"out_dtype": "f16", "n": 48, "k": 256}),
    ("fp8_matmul_rows", {"out_dtype": "bf16"}),
    ("fp8_matmul_tokens", {"out_dtype": "f32"}),
    ("fp8_matmul_tokens", {"out_dtype": "f16", "w_scales": "rows", "n": 48, "k": 256}),
    ("fp8_matmul_tokens", {"out_dtype": "bf16", "w_scales": "rows"}),
    ("fp8_attention", {"out_dtype": "f32"}),
    ("fp8_attention", {"out_dtype": "f16", "head_dim": 128, "group": 4}),
    ("q8_0_matmul", {}), ("q4_1_matmul", {}), ("q8_0_rows", {}), ("q4_1_rows", {}),
    ("q4_k_matmul", {}), ("q4_k_matmul", {"n": 40, "k": 256}), ("q4_k_rows", {}),
    ("q6_k_matmul", {}), ("q6_k_matmul", {"n": 40, "k": 256}), ("q6_k_rows", {}),
    ("q8_0_expert_matmul", {}), ("q4_1_expert_matmul", {}), ("q4_k_expert_matmul", {}),
    ("q6_k_expert_matmul", {"e": 3, "n": 40, "k": 256}),
    ("q8_0_matmul_blocks", {}), ("q4_1_matmul_blocks", {}), ("q4_k_matmul_blocks", {}),
    ("q4_k_matmul_blocks", {"n": 40, "k": 256}),
    ("q8_0_dequant", {}), ("q4_1_dequant", {}), ("q4_k_dequant", {}), ("q6_k_dequant", {}),
    ("q6_k_dequant", {"n": 40, "k": 256}),
    ("moe_topk", {}), ("moe_topk", {"e": 4, "k": 3, "renormalize": 0}),
    ("moe_group", {}), ("moe_group", {"e": 3}),
    ("expert_matmul", {}), ("expert_matmul", {"dtype": "f32", "slots": 2}),
    ("expert_matmul", {"dtype": "bf16", "e": 8, "slots": 3}),
]


def test_every_kernel_has_a_check():
    from halo_mlir.kernels import KERNELS

    assert {name for name, _ in CHECKS} == set(KERNELS)


@pytest.mark.parametrize("name,params", CHECKS, ids=lambda x: x if isinstance(x, str) else
                         "-".join(f"{k}{v}" for k, v in x.items()) or "defaults")
def test_kernel_matches_numpy_reference(name, params):
    from halo_mlir.kernels.workbench import check, instance

    r = check(instance(name, params))
    print(f"{name} {params}: max |error| {r.max_error:.3g} (tolerance {r.tolerance:.3g})")
    assert r.ok, r


def test_constraint_and_template_errors(tmp_path):
    import shutil

    from halo_mlir.errors import HaloError
    from halo_mlir.kernels import KERNELS, TEMPLATE_DIR, render
    from halo_mlir.kernels.workbench import instance

    with pytest.raises(HaloError, match="head_dim=20 must be a positive multiple of 16"):
        render(KERNELS["paged_decode_attention"], {"head_dim": 20})
    with pytest.raises(HaloError, match="dtype=f8 is not one of f16, bf16, f32"):
        render(KERNELS["paged_prefill_attention"], {"dtype": "f8"})
    with pytest.raises(HaloError, match="moe_topk: k=9 is above e=8"):
        render(KERNELS["moe_topk"], {"k": 9})
    with pytest.raises(HaloError, match="renormalize=2 must be 0 or 1"):
        render(KERNELS["moe_topk"], {"renormalize": 2})
    with pytest.raises(HaloError, match="unknown size 'q'"):
        instance("fp8_matmul", {}, {"q": 3})
    # An author's broken copy: the template line (jinja) or the rendered line (MLIR) is named.
    shutil.copytree(TEMPLATE_DIR, tmp_path / "t")
    path = tmp_path / "t" / "fp8_matmul.mlir.j2"
    text = path.read_text()
    path.write_text(text.replace("{{k}}xf8E4M3FNUZ>", "{{kk}}xf8E4M3FNUZ>", 1))
    with pytest.raises(HaloError, match=r"fp8_matmul.mlir.j2:5: 'kk' is undefined"):
        render(KERNELS["fp8_matmul"], {}, tmp_path / "t")
    path.write_text(text.replace("%scale = arith.mulf", "%scale = arith.mulff"))
    with pytest.raises(HaloError, match=r"does not parse at fp8_matmul.mlir.j2:28: .*arith.mulff"):
        instance("fp8_matmul", {}, template_dir=tmp_path / "t")


def test_workbench_cli(tmp_path):
    """kernel list / show / check through the CLI, with an edited template (--template-dir)."""
    import shutil

    from conftest import halo
    from halo_mlir.kernels import TEMPLATE_DIR

    listing = halo("kernel", "list").stdout
    assert "paged_decode_attention" in listing and "--param head_dim=" in listing
    shown = halo("kernel", "show", "fp8_matmul", "--param", "n=32", "--param", "k=64").stdout
    assert "util.func private @halo_fp8_matmul_n32_k64_out_dtypef16(" in shown
    ok = halo("kernel", "check", "paged_decode_attention", "--param", "dtype=f32",
              "--size", "blocks=2")
    assert "ok" in ok.stdout and "max |error|" in ok.stdout
    # An edit that breaks the numbers: the check fails with exit 1.
    shutil.copytree(TEMPLATE_DIR, tmp_path / "t")
    path = tmp_path / "t" / "paged_decode_attention.mlir.j2"
    path.write_text(path.read_text().replace("arith.cmpi slt, %t64, %len", "arith.cmpi sle, %t64, %len"))
    bad = halo("kernel", "check", "paged_decode_attention", "--param", "dtype=f32",
               "--template-dir", tmp_path / "t", check=False)
    assert bad.returncode == 1 and "FAILED" in bad.stdout
    # emit renders the model's kernels from the same folder
    path.write_text(path.read_text().replace("{{stride}}", "{{strde}}", 1))
    proc = halo("emit", "--model", "toy", "--layers", 1, "--template-dir", tmp_path / "t",
                "-o", tmp_path / "m.mlir", check=False)
    assert proc.returncode == 1 and "paged_decode_attention.mlir.j2" in proc.stderr and \
        "'strde' is undefined" in proc.stderr, proc.stderr
    for args, msg in [(("show", "nope"), "error: unknown kernel 'nope'"),
                      (("show", "fp8_matmul", "--param", "k=48"), "k=48 must be a positive multiple of 32"),
                      (("show", "fp8_matmul", "--param", "z=1"), "unknown parameter 'z'")]:
        proc = halo("kernel", *args, check=False)
        assert proc.returncode == 1 and msg in proc.stderr, proc.stderr
