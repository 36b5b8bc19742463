"""Each templated kernel compiled alone for CPU, run on random blocks, against numpy using
the gguf package's own dequantization as the reference."""

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
