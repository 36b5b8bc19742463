"""Q8_0 / Q4_1 / Q4_K / Q6_K kernels (dequantize-in-matmul, row gather) and their numpy
references."""

from __future__ import annotations

import numpy as np

from halo_mlir.kernels.registry import Arg, Harness, Kernel, Param, positive, positive_multiple_of


LANES = (0, 16)  # the matmul forms of Q8_0 / Q4_1 (docs/cpu-quantized.md)
BLOCKS_FORMATS = ("q8_0", "q4_1", "q4_k")  # those with a `{fmt}_matmul_blocks` kernel


def _lanes(v: int) -> str | None:
    return None if v in LANES else f"must be one of {', '.join(map(str, LANES))}"


def _params(block: int, matmul: bool = False) -> dict[str, Param]:
    params = {"n": Param(int, "rows of the weight (output features)", positive, 96),
              "k": Param(int, "columns of the weight (input features)",
                         positive_multiple_of(block), 64 if block == 32 else 512)}
    if matmul and block == 32:
        params["lanes"] = Param(int, "0: one in-order reduction over K (the GPU form); 16: "
                                "16 partial sums, one per position in a half block, added "
                                "last (the CPU form)", _lanes, 0, omit_default=True)
    return params


def dequantize(fmt: str, fields: list[np.ndarray]) -> np.ndarray:
    """llama.cpp's block formats in numpy: fields as halo_mlir.quantization.blocks splits them -> [N, K] f32."""
    f32 = lambda a: a.astype(np.float32)  # noqa: E731
    if fmt == "q8_0":
        d, qs = fields
        w = f32(d)[..., None] * f32(qs)
    elif fmt == "q4_1":  # byte i holds element i (low nibble) and 16 + i (high nibble)
        d, m, qs = fields
        u = qs.view(np.uint8)
        nib = np.concatenate([u & 15, u >> 4], axis=-1).astype(np.float32)
        w = f32(d)[..., None] * nib + f32(m)[..., None]
    elif fmt == "q4_k":  # qs byte (j, i): elements 64j + i (low), 64j + 32 + i (high)
        d, dmin, sc, m, qs = fields
        u = qs.view(np.uint8)[..., None, :]  # [N, B, 4, 1, 32]
        nib = f32((u >> np.array([0, 4], np.uint8)[:, None]) & 15).reshape(*qs.shape[:2], 8, 32)
        scale = f32(d)[..., None] * f32(sc.view(np.uint8))
        offset = f32(dmin)[..., None] * f32(m.view(np.uint8))
        w = scale[..., None] * nib - offset[..., None]
    else:  # q6_k, element 128g + r: low 4 bits in nibble r // 64 of ql (g, r % 64), high 2
        d, sc, ql, qh = fields  # in bits 2 (r // 32) and up of qh (g, r % 32)
        lo = ql.view(np.uint8)[:, :, :, None, :] >> np.array([0, 4], np.uint8)[:, None]
        lo = (lo & 15).reshape(*ql.shape[:2], 2, 128)
        hi = qh.view(np.uint8)[:, :, :, None, :] >> np.array([0, 2, 4, 6], np.uint8)[:, None]
        hi = (hi & 3).reshape(*qh.shape[:2], 2, 128)
        q = f32((lo | (hi << 4)).astype(np.int8) - np.int8(32)).reshape(*ql.shape[:2], 16, 16)
        w = (f32(d)[..., None] * f32(sc))[..., None] * q
    return w.reshape(w.shape[0], -1)


def random_blocks(fmt_name: str, n: int, k: int, rng, kinds: bool = True,
                  top: float = 1.0) -> np.ndarray:
    """Raw GGUF blocks uint8 [n, k/block * block_bytes] of format `fmt_name`: Q8_0/Q4_1
    quantized from a normal weight by the gguf package; Q4_K/Q6_K (which it cannot quantize)
    built from random bytes, each super-block one of: random scales, the largest f16 d/dmin,
    the smallest (subnormal) ones, every sub-block scale (and Q4_K min) 63, all zero
    (kinds=False: only random ones, with d chosen so weights stay within about +-top)."""
    import gguf

    from halo_mlir.quantization.blocks import FORMATS

    fmt = FORMATS[fmt_name]
    if fmt.block == 32:
        w = (top * rng.standard_normal((n, k))).astype(np.float32)
        return gguf.quants.quantize(w, gguf.GGMLQuantizationType[fmt.ggml])
    blocks = rng.integers(0, 256, (n, k // fmt.block, fmt.block_bytes), dtype=np.uint8)
    scale_at = {"q4_k": (0, 2), "q6_k": (208,)}[fmt_name]  # d (and dmin) byte offsets
    top = top / (63 * 15) if fmt_name == "q4_k" else top / (127 * 32)
    d = rng.uniform(0.25, 1.0, (n, k // fmt.block, len(scale_at))) * top
    if fmt_name == "q4_k":  # dmin = 7.5 d: the weights centre on 0 (q averages 7.5)
        d[..., 1] = d[..., 0] * 7.5
    d = d.astype(np.float16)
    kind = rng.integers(0, 5 if kinds else 1, (n, k // fmt.block))
    d[kind == 1] = np.float16(65504.0)
    d[kind == 2] = np.float16(2.0 ** -24)
    for i, at in enumerate(scale_at):
        blocks[:, :, at:at + 2] = d[..., i:i + 1].view(np.uint8)
    scales = slice(4, 16) if fmt_name == "q4_k" else slice(192, 208)
    blocks[kind == 3, scales] = 0xFF if fmt_name == "q4_k" else 63
    blocks[kind == 4] = 0
    return blocks.reshape(n, -1)


def _quantized_weight(fmt_name: str, n: int, k: int, rng, kinds: bool) -> list[np.ndarray]:
    from halo_mlir.quantization.blocks import FORMATS

    raw = random_blocks(fmt_name, n, k, rng, kinds)
    return list(FORMATS[fmt_name].split(raw, n, k).values())


def _field_args(fmt_name: str, n: int, k: int) -> list[Arg]:
    from halo_mlir.quantization.blocks import FORMATS

    return [Arg(f, shape, dtype) for f, (shape, dtype) in FORMATS[fmt_name].field_shapes(n, k).items()]


def _family(fmt: str, block: int) -> list[Kernel]:
    # The matmul's check takes weights within about +-1 (its tolerance is absolute); the
    # gather, exact, takes every kind of block (tests/unit/test_kernels.py has the extremes).
    matmul = Harness(
        sizes={"m": (5, 64, "rows of x")},
        args=lambda v, z: ([Arg("x", (z["m"], v["k"]), "f32"), *_field_args(fmt, v["n"], v["k"])],
                           [Arg("out", (z["m"], v["n"]), "f32")]),
        inputs=lambda v, z, rng: [rng.standard_normal((z["m"], v["k"])).astype(np.float32),
                                  *_quantized_weight(fmt, v["n"], v["k"], rng, False)],
        reference=lambda v, ins: [ins[0] @ dequantize(fmt, ins[1:]).T],
        tolerance=lambda v: 1e-3)
    rows = Harness(
        sizes={"t": (5, 64, "rows looked up")},
        args=lambda v, z: ([Arg("ids", (z["t"],), "i64"), *_field_args(fmt, v["n"], v["k"])],
                           [Arg("out", (z["t"], v["k"]), "f32")]),
        inputs=lambda v, z, rng: [rng.integers(0, v["n"], z["t"]).astype(np.int64),
                                  *_quantized_weight(fmt, v["n"], v["k"], rng, True)],
        reference=lambda v, ins: [dequantize(fmt, ins[1:])[ins[0]]],
        tolerance=lambda v: 0.0)
    dequant = Harness(
        sizes={},
        args=lambda v, z: (_field_args(fmt, v["n"], v["k"]), [Arg("out", (v["n"], v["k"]), "f32")]),
        inputs=lambda v, z, rng: _quantized_weight(fmt, v["n"], v["k"], rng, True),
        reference=lambda v, ins: [dequantize(fmt, ins)],
        tolerance=lambda v: 0.0)
    upper = fmt.upper()
    return [Kernel(f"{fmt}_dequant", f"{upper} w[N,K], dequantized -> [N,K] f32 (the CPU "
                   "prefill's weight, multiplied by a plain matmul)", _params(block),
                   harness=dequant),
            Kernel(f"{fmt}_matmul", f"x[M,K] f32 @ {upper} w[N,K]^T -> [M,N] f32",
                   _params(block, matmul=True),
                   harness=matmul),
            *([Kernel(f"{fmt}_matmul_blocks", f"x[M,K] f32 @ {upper} w[N,K]^T -> [M,N] f32, the "
                      "block loop unrolled into one elementwise op over 16/32 lanes (the CPU "
                      "decode form)", _params(block), harness=matmul)]
              if fmt in BLOCKS_FORMATS else []),
            Kernel(f"{fmt}_rows", f"rows ids[T] of {upper} w[N,K], dequantized -> [T,K] f32",
                   _params(block), harness=rows)]


def expert_weights(fmt_name: str, e: int, n: int, k: int, rng,
                   kinds: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """E experts' raw blocks uint8 [e, n, k/block * block_bytes] (random_blocks) and their
    fields [e, n, k/block, ...] (halo_mlir.quantization.blocks's expert layout)."""
    from halo_mlir.quantization.blocks import FORMATS

    raw = random_blocks(fmt_name, e * n, k, rng, kinds)
    fields = FORMATS[fmt_name].split(raw, e * n, k)
    return raw.reshape(e, n, -1), [f.reshape(e, n, *f.shape[1:]) for f in fields.values()]


def expert_reference(fmt: str, x: np.ndarray, ids: np.ndarray,
                     fields: list[np.ndarray]) -> np.ndarray:
    """out[m] = x[m] @ dequant(expert ids[m])^T: the expert matmul in numpy."""
    out = np.zeros((x.shape[0], fields[0].shape[1]), np.float32)
    for e in np.unique(ids):
        rows = ids == e
        out[rows] = x[rows] @ dequantize(fmt, [f[e] for f in fields]).T
    return out


def _expert_kernel(fmt: str, block: int) -> Kernel:
    """`{fmt}_expert_matmul`: each row of x through the expert its id picks, the expert's
    blocks read inside the contraction (the MoE decode form, ops/moe.py)."""
    params = {"e": Param(int, "experts stacked in the weight", positive, 4), **_params(block)}

    def fields(v):
        return [Arg(a.name, (v["e"], *a.shape), a.dtype) for a in _field_args(fmt, v["n"], v["k"])]
    harness = Harness(
        sizes={"m": (5, 64, "rows of x (token, slot) pairs")},
        args=lambda v, z: ([Arg("x", (z["m"], v["k"]), "f32"), Arg("ids", (z["m"],), "i64"),
                            *fields(v)], [Arg("out", (z["m"], v["n"]), "f32")]),
        inputs=lambda v, z, rng: [rng.standard_normal((z["m"], v["k"])).astype(np.float32),
                                  rng.integers(0, v["e"], z["m"]).astype(np.int64),
                                  *expert_weights(fmt, v["e"], v["n"], v["k"], rng)[1]],
        reference=lambda v, ins: [expert_reference(fmt, ins[0], ins[1], ins[2:])],
        tolerance=lambda v: 1e-3)
    return Kernel(f"{fmt}_expert_matmul",
                  f"x[M,K] f32 @ {fmt.upper()} w[ids[M]][N,K]^T (E experts) -> [M,N] f32",
                  params, harness=harness)


KERNELS = [*_family("q8_0", 32), *_family("q4_1", 32), *_family("q4_k", 256),
           *_family("q6_k", 256),
           *(_expert_kernel(f, blk) for f, blk in (("q8_0", 32), ("q4_1", 32), ("q4_k", 256),
                                                   ("q6_k", 256)))]
