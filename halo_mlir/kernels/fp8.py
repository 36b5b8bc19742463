"""FP8 (f8E4M3FNUZ, MI300X's FP8) kernels with per-tensor (and, for the matmul, per-row
weight) scales and their numpy references.

The references apply each scale to its tensor before the math (dequantize, then compute in
f32); the kernels fold the scales (after the contraction, into the softmax scale): the
check compares the two.
"""

from __future__ import annotations

import numpy as np

from halo_mlir.kernels.registry import (Arg, Harness, Kernel, Param, positive, positive_multiple_of,
                               softmax_scale)
from halo_mlir.kernels.attention import softmax_attend

FP8 = "f8E4M3FNUZ"
OUT_DTYPES = ("f16", "bf16", "f32")
TOLERANCE = {"f32": 1e-4, "f16": 5e-3, "bf16": 3e-2}
# IREE's attention multiplies P (the softmax weights) by V in V's type, so with fp8 V the
# probabilities are rounded to fp8: ~2e-2 against an f32 reference (NOTES.md).
ATTENTION_TOLERANCE = 5e-2
SCALES = (0.5, 0.25, 0.75)  # x/q, w/k, v: values of the kind a calibration produces


def _np(dtype: str):
    from halo_mlir.kernels.registry import numpy_dtype

    return numpy_dtype(dtype)


def _fp8(rng, shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32).astype(_np(FP8))


def _dequant(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) * np.float32(scale[0])


# ---- fp8_matmul ----------------------------------------------------------------------
def matmul_reference(v: dict, ins: list[np.ndarray]) -> list[np.ndarray]:
    x, w, xs, ws = ins
    return [_dequant(x, xs) @ _dequant(w, ws).T]


_MATMUL = Harness(
    sizes={"m": (16, 256, "rows M of x (dynamic)")},
    args=lambda v, z: ([Arg("x", (z["m"], v["k"]), FP8), Arg("w", (v["n"], v["k"]), FP8),
                        Arg("x_scale", (), "f32"), Arg("w_scale", (), "f32")],
                       [Arg("out", (z["m"], v["n"]), v["out_dtype"])]),
    inputs=lambda v, z, rng: [_fp8(rng, (z["m"], v["k"])), _fp8(rng, (v["n"], v["k"])),
                              np.array([SCALES[0]], np.float32),
                              np.array([SCALES[1]], np.float32)],
    reference=matmul_reference,
    tolerance=lambda v: TOLERANCE[v["out_dtype"]] * max(1.0, np.sqrt(v["k"]) / 8))


# ---- fp8_matmul_rows: one weight scale per row (per-channel) ------------------------------
def matmul_rows_reference(v: dict, ins: list[np.ndarray]) -> list[np.ndarray]:
    """Each weight row dequantized with its own scale, then the f32 matmul."""
    x, w, xs, ws = ins
    return [_dequant(x, xs) @ (w.astype(np.float32) * ws.astype(np.float32)[:, None]).T]


def _row_scales(rng, n: int) -> np.ndarray:
    """Scales spread over two orders of magnitude, as a calibration's per-row amax gives."""
    return (SCALES[1] * np.exp(rng.uniform(-2.3, 2.3, n))).astype(np.float32)


_MATMUL_ROWS = Harness(
    sizes={"m": (16, 256, "rows M of x (dynamic)")},
    args=lambda v, z: ([Arg("x", (z["m"], v["k"]), FP8), Arg("w", (v["n"], v["k"]), FP8),
                        Arg("x_scale", (), "f32"), Arg("w_scale", (v["n"],), "f32")],
                       [Arg("out", (z["m"], v["n"]), v["out_dtype"])]),
    inputs=lambda v, z, rng: [_fp8(rng, (z["m"], v["k"])), _fp8(rng, (v["n"], v["k"])),
                              np.array([SCALES[0]], np.float32), _row_scales(rng, v["n"])],
    reference=matmul_rows_reference,
    # The scales reach ~10x SCALES[1]: the bound of fp8_matmul, scaled by the largest.
    tolerance=lambda v: TOLERANCE[v["out_dtype"]] * 10 * max(1.0, np.sqrt(v["k"]) / 8))


# ---- fp8_matmul_tokens: one input scale per row (dynamic per-token scales) ---------------
def matmul_tokens_reference(v: dict, ins: list[np.ndarray]) -> list[np.ndarray]:
    """Each input row (scale min(max(amax, 1e-12), ub) / 224) and the weight dequantized
    with their scales, then the f32 matmul."""
    x, amax, ub, w, ws = ins
    xs = np.minimum(np.maximum(amax, np.float32(1e-12)), ub[0]) / np.float32(224.0)
    ws = ws.astype(np.float32)
    w32 = w.astype(np.float32) * (ws[:, None] if ws.ndim else ws)
    return [(x.astype(np.float32) * xs.astype(np.float32)[:, None]) @ w32.T]


_MATMUL_TOKENS = Harness(
    sizes={"m": (16, 256, "rows M of x (dynamic): tokens, each with its own scale")},
    args=lambda v, z: ([Arg("x", (z["m"], v["k"]), FP8), Arg("x_amax", (z["m"],), "f32"),
                        Arg("ub", (), "f32"), Arg("w", (v["n"], v["k"]), FP8),
                        Arg("w_scale", (v["n"],) if v["w_scales"] == "rows" else (), "f32")],
                       [Arg("out", (z["m"], v["n"]), v["out_dtype"])]),
    # amax around 224 * the scales; the bound cuts the largest rows' (as fbgemm's does)
    inputs=lambda v, z, rng: [_fp8(rng, (z["m"], v["k"])), 224 * _row_scales(rng, z["m"]),
                              np.array([224 * SCALES[0] * 3], np.float32),
                              _fp8(rng, (v["n"], v["k"])),
                              _row_scales(rng, v["n"]) if v["w_scales"] == "rows"
                              else np.array([SCALES[1]], np.float32)],
    reference=matmul_tokens_reference,
    # as fp8_matmul_rows: the scales reach ~10x their centre
    tolerance=lambda v: TOLERANCE[v["out_dtype"]] * 10 * max(1.0, np.sqrt(v["k"]) / 8))


# ---- fp8_attention -------------------------------------------------------------------
def attention_reference(v: dict, ins: list[np.ndarray]) -> list[np.ndarray]:
    q, k, vv, lens, qs, ks, vs = ins
    out = np.empty(q.shape, np.float32)
    t = np.arange(k.shape[2])
    for n in range(q.shape[0]):
        keep = np.broadcast_to(t[None, :] < lens[n], (q.shape[3], t.size))
        out[n] = softmax_attend(_dequant(q[n], qs), _dequant(k[n], ks), _dequant(vv[n], vs),
                                 keep)
    return [out]


def _attention_args(v, z):
    n, kvh, g, d = v["batch"], v["kv_heads"], v["group"], v["head_dim"]
    return ([Arg("q", (n, kvh, g, z["s"], d), FP8), Arg("k", (n, kvh, z["t"], d), FP8),
             Arg("v", (n, kvh, z["t"], d), FP8), Arg("seq_lens", (n,), "i64"),
             Arg("q_scale", (), "f32"), Arg("k_scale", (), "f32"), Arg("v_scale", (), "f32")],
            [Arg("out", (n, kvh, g, z["s"], d), v["out_dtype"])])


def _attention_inputs(v, z, rng):
    n, kvh, g, d = v["batch"], v["kv_heads"], v["group"], v["head_dim"]
    return [_fp8(rng, (n, kvh, g, z["s"], d)), _fp8(rng, (n, kvh, z["t"], d)),
            _fp8(rng, (n, kvh, z["t"], d)), rng.integers(1, z["t"] + 1, n).astype(np.int64),
            *(np.array([s], np.float32) for s in SCALES)]


KERNELS = [
    Kernel("fp8_matmul",
           "x[M,K] f8E4M3FNUZ @ w[N,K]^T f8E4M3FNUZ, per-tensor scales x_scale, w_scale (0-d f32) "
           "-> [M,N] out_dtype (f32 accumulation)",
           {"n": Param(int, "rows of w (output features)", positive, 64),
            "k": Param(int, "the contraction: MFMA_F32_16x16x32_F8 needs a multiple of 32",
                       positive_multiple_of(32), 128),
            "out_dtype": Param(str, "result type", default="f16", choices=OUT_DTYPES)},
           harness=_MATMUL),
    Kernel("fp8_matmul_rows",
           "x[M,K] f8E4M3FNUZ @ w[N,K]^T f8E4M3FNUZ, x_scale (0-d f32) and one weight scale "
           "per row w_scale[N] f32 (per-channel) -> [M,N] out_dtype (f32 accumulation)",
           {"n": Param(int, "rows of w (output features)", positive, 64),
            "k": Param(int, "the contraction: MFMA_F32_16x16x32_F8 needs a multiple of 32",
                       positive_multiple_of(32), 128),
            "out_dtype": Param(str, "result type", default="f16", choices=OUT_DTYPES)},
           harness=_MATMUL_ROWS),
    Kernel("fp8_matmul_tokens",
           "x[M,K] f8E4M3FNUZ with one scale per row from its amax x_amax[M] and the bound "
           "ub (dynamic per-token) @ "
           "w[N,K]^T f8E4M3FNUZ with w_scale (0-d, or [N] with w_scales=rows) -> [M,N] "
           "out_dtype (f32 accumulation)",
           {"n": Param(int, "rows of w (output features)", positive, 64),
            "k": Param(int, "the contraction: MFMA_F32_16x16x32_F8 needs a multiple of 32",
                       positive_multiple_of(32), 128),
            "w_scales": Param(str, "the weight's scales: one (tensor) or one per row (rows)",
                              default="tensor", choices=("tensor", "rows")),
            "out_dtype": Param(str, "result type", default="f16", choices=OUT_DTYPES)},
           harness=_MATMUL_TOKENS),
    Kernel("fp8_attention",
           "q[N,KVH,G,S,D], k/v[N,KVH,T,D] f8E4M3FNUZ, seq_lens[N], q/k/v scales f32 -> "
           "[N,KVH,G,S,D] out_dtype: q/k scales folded into the softmax scale, v's on the output",
           {"batch": Param(int, "rows N", positive, 2),
            "kv_heads": Param(int, "kv heads KVH", positive, 2),
            "group": Param(int, "query heads per kv head G", positive, 3),
            "head_dim": Param(int, "head dim D: a multiple of 32 (the fp8 MFMA's K)",
                              positive_multiple_of(32), 64),
            "out_dtype": Param(str, "result type", default="f16", choices=OUT_DTYPES)},
           derived=softmax_scale,
           harness=Harness({"s": (16, 128, "query length S"),
                            "t": (40, 2048, "key length T (keys t >= seq_lens[n] masked)")},
                           _attention_args, _attention_inputs, attention_reference,
                           lambda v: ATTENTION_TOLERANCE)),
]
