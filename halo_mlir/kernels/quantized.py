"""Q8_0 / Q4_1 kernels (dequantize-in-matmul, row gather) and their numpy references."""

from __future__ import annotations

import numpy as np

from halo_mlir.kernels import Arg, Harness, Kernel, Param, positive, positive_multiple_of

_PARAMS = {
    "n": Param(int, "rows of the weight (output features)", positive, 96),
    "k": Param(int, "columns of the weight (input features)", positive_multiple_of(32), 64),
}

def dequantize(fmt: str, fields: list[np.ndarray]) -> np.ndarray:
    """llama.cpp's block formats in numpy: fields as halo_mlir.quant splits them -> [N, K] f32."""
    if fmt == "q8_0":
        d, qs = fields
        w = d.astype(np.float32)[..., None] * qs.astype(np.float32)
    else:  # q4_1: byte i holds element i (low nibble) and 16 + i (high nibble)
        d, m, qs = fields
        u = qs.view(np.uint8)
        nib = np.concatenate([u & 15, u >> 4], axis=-1).astype(np.float32)
        w = d.astype(np.float32)[..., None] * nib + m.astype(np.float32)[..., None]
    return w.reshape(w.shape[0], -1)

def _quantized_weight(fmt_name: str, n: int, k: int, rng) -> list[np.ndarray]:
    import gguf

    from halo_mlir.quant import FORMATS

    fmt = FORMATS[fmt_name]
    w = rng.standard_normal((n, k)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[fmt.ggml])
    return list(fmt.split(raw, n, k).values())

def _field_args(fmt_name: str, n: int, k: int) -> list[Arg]:
    from halo_mlir.quant import FORMATS

    return [Arg(f, shape, dtype) for f, (shape, dtype) in FORMATS[fmt_name].field_shapes(n, k).items()]

def _family(fmt: str) -> list[Kernel]:
    matmul = Harness(
        sizes={"m": (5, 64, "rows of x")},
        args=lambda v, z: ([Arg("x", (z["m"], v["k"]), "f32"), *_field_args(fmt, v["n"], v["k"])],
                           [Arg("out", (z["m"], v["n"]), "f32")]),
        inputs=lambda v, z, rng: [rng.standard_normal((z["m"], v["k"])).astype(np.float32),
                                  *_quantized_weight(fmt, v["n"], v["k"], rng)],
        reference=lambda v, ins: [ins[0] @ dequantize(fmt, ins[1:]).T],
        tolerance=lambda v: 1e-3)
    rows = Harness(
        sizes={"t": (5, 64, "rows looked up")},
        args=lambda v, z: ([Arg("ids", (z["t"],), "i64"), *_field_args(fmt, v["n"], v["k"])],
                           [Arg("out", (z["t"], v["k"]), "f32")]),
        inputs=lambda v, z, rng: [rng.integers(0, v["n"], z["t"]).astype(np.int64),
                                  *_quantized_weight(fmt, v["n"], v["k"], rng)],
        reference=lambda v, ins: [dequantize(fmt, ins[1:])[ins[0]]],
        tolerance=lambda v: 0.0)
    upper = fmt.upper()
    return [Kernel(f"{fmt}_matmul", f"x[M,K] f32 @ {upper} w[N,K]^T -> [M,N] f32", _PARAMS,
                   harness=matmul),
            Kernel(f"{fmt}_rows", f"rows ids[T] of {upper} w[N,K], dequantized -> [T,K] f32",
                   _PARAMS, harness=rows)]

KERNELS = [*_family("q8_0"), *_family("q4_1")]
