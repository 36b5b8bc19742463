"""Each templated kernel compiled alone for CPU and run on random inputs: the quantized ones
against the gguf package's own dequantization, every registered kernel against the numpy
reference beside its registry entry (what `halo-mlir kernel check` runs); parameter,
constraint and template errors; the workbench CLI."""

import numpy as np
import pytest

N, K, M = 48, 96, 5


def quantized(fmt, rng):
    import gguf

    from halo_mlir.quant import FORMATS

    w = rng.standard_normal((N, K)).astype(np.float32)
    t = gguf.GGMLQuantizationType[FORMATS[fmt].ggml]
    raw = gguf.quants.quantize(w, t)
    return gguf.quants.dequantize(raw, t), FORMATS[fmt].split(raw, N, K)


def run_kernel(tmp_path, kernel, fields, first, first_type, out_shape):
    import iree.runtime as rt

    from halo_mlir import kernels
    from halo_mlir.compile import compile_file
    from halo_mlir.ir_builder import Builder

    b = Builder()
    with b.context, b.at("test"):
        module = b.new_module()
        types = [b.tensor_type(*first_type)] + [
            b.tensor_type(a.shape, {np.float16: "f16", np.int8: "i8"}[a.dtype.type])
            for a in fields.values()]
        symbol = kernels.instantiate(b, kernel, n=N, k=K)
        b.define("main", types, lambda *args: b.call(
            symbol, list(args), [b.tensor_type(out_shape, "f32")])[0])
        (tmp_path / "k.mlir").write_text(str(module))
    compile_file(tmp_path / "k.mlir", tmp_path / "k.vmfb", target="cpu", echo=lambda m: None)
    config = rt.Config("local-task")
    ctx = rt.SystemContext(config=config)
    ctx.add_vm_module(rt.VmModule.mmap(config.vm_instance, str(tmp_path / "k.vmfb")))
    return np.asarray(ctx.modules.module.main(first, *fields.values()).to_host())


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1"])
def test_quantized_matmul_matches_numpy(tmp_path, fmt):
    rng = np.random.default_rng(0)
    w, fields = quantized(fmt, rng)
    x = rng.standard_normal((M, K)).astype(np.float32)
    got = run_kernel(tmp_path, f"{fmt}_matmul", fields, x, ([None, K], "f32"), [None, N])
    np.testing.assert_allclose(got, x @ w.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1"])
def test_quantized_rows_match_numpy(tmp_path, fmt):
    rng = np.random.default_rng(1)
    w, fields = quantized(fmt, rng)
    ids = np.array([3, 0, 47, 3, 12], np.int64)
    got = run_kernel(tmp_path, f"{fmt}_rows", fields, ids, ([None], "i64"), [None, K])
    np.testing.assert_array_equal(got, w[ids])


def test_kernel_parameter_errors():
    from halo_mlir.errors import HaloError
    from halo_mlir.kernels import KERNELS, kernel, render

    with pytest.raises(HaloError, match="k=40 must be a positive multiple of 32"):
        render(KERNELS["q4_1_matmul"], {"n": 8, "k": 40})
    with pytest.raises(HaloError, match="unknown parameter 'z'"):
        render(KERNELS["q4_1_matmul"], {"n": 8, "k": 32, "z": 1})
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
    ("fp8_attention", {"out_dtype": "f32"}),
    ("fp8_attention", {"out_dtype": "f16", "head_dim": 128, "group": 4}),
    ("q8_0_matmul", {}), ("q4_1_matmul", {}), ("q8_0_rows", {}), ("q4_1_rows", {}),
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
