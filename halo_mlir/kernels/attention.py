"""Paged attention kernels (decode, prefill) over the docs/ABI.md cache and their numpy references.

The cache argument is the 6-D view [P, layers, 2, kv_heads, stride, head_dim]. The layer is
a runtime value so every layer of a model shares one kernel (per-layer constants in kernels
multiply the compiled kernels: NOTES.md, "Kernel dedup across layers"): prefill takes
`layer` as an i64, decode takes the gather rows (page, layer, k/v) that the model computes
for every layer once per step (`kv_cache.decode_tables`).
"""

from __future__ import annotations

import math

import numpy as np

from halo_mlir.kernels.registry import (Arg, Harness, Kernel, Param, positive, positive_multiple_of,
                               softmax_scale)

DTYPES = ("f16", "bf16", "f32")
FP8 = "f8E4M3FNUZ"
TOLERANCE = {"f32": 1e-4, "f16": 5e-3, "bf16": 3e-2}


def _params(batch: int) -> dict[str, Param]:
    return {
        "dtype": Param(str, "element type of q, the cache and the output", default="f16",
                       choices=DTYPES),
        "batch": Param(int, "rows N (static: one kernel per batch size)", positive, batch),
        "kv_heads": Param(int, "kv heads KVH", positive, 2),
        "group": Param(int, "query heads per kv head G", positive, 3),
        "head_dim": Param(int, "head dim D: the f16 MFMA tiles of gfx942 need a multiple of 16",
                          positive_multiple_of(16), 64),
        "stride": Param(int, "positions per page (block_seq_stride)", positive, 16),
        "layers": Param(int, "layers in a cache page", positive, 2),
    }


# ---- numpy references ----------------------------------------------------------------
def _f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(np.float32)


def softmax_attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """q[H,G,M,D], k/v[H,T,D], keep[M,T] -> [H,G,M,D], f32 softmax."""
    s = np.einsum("hgmd,htd->hgmt", q, k) / np.float32(math.sqrt(q.shape[-1]))
    s = np.where(keep, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hgmt,htd->hgmd", p, v)


def _rows_pages(cache: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """One row's gather rows [B, 3] (page, layer, k/v) -> [KVH, B*stride, D]."""
    blocks = cache[rows[:, 0], rows[:, 1], rows[:, 2]]  # [B, KVH, stride, D]
    return blocks.transpose(1, 0, 2, 3).reshape(blocks.shape[1], -1, blocks.shape[3])


def decode_reference(values: dict, ins: list[np.ndarray]) -> list[np.ndarray]:
    q, cache, k_rows, v_rows, lens = ins
    c = _f32(cache)
    out = np.empty(q.shape, np.float32)
    for n in range(q.shape[0]):
        k, v = (_rows_pages(c, r[n]) for r in (k_rows, v_rows))
        keep = (np.arange(k.shape[1]) < lens[n])[None, :]
        out[n] = softmax_attend(_f32(q[n])[:, :, None], k, v, keep)[:, :, 0]
    return [out]


def decode_fp8_reference(values: dict, ins: list[np.ndarray]) -> list[np.ndarray]:
    """The fp8 cache dequantized (k * k_scale, v * v_scale), then plain decode attention."""
    q, cache, k_rows, v_rows, lens, k_scale, v_scale = ins
    c = _f32(cache)
    c[:, :, 0] *= k_scale[0]
    c[:, :, 1] *= v_scale[0]
    return decode_reference(values, [q, c, k_rows, v_rows, lens])


def prefill_reference(values: dict, ins: list[np.ndarray]) -> list[np.ndarray]:
    q, k, v, lens, cache, pages, layer = ins
    n_rows, s = q.shape[:2]
    stride = values["stride"]
    new_cache = cache.copy()
    out = np.empty(q.shape, np.float32)
    t = np.arange(s)
    for n in range(n_rows):
        for b, page in enumerate(pages[n]):
            for which, x in ((0, k), (1, v)):
                new_cache[page, int(layer[0]), which] = x[n, :, b * stride:(b + 1) * stride]
        keep = (t[None, :] <= t[:, None]) & (t[None, :] < lens[n])
        o = softmax_attend(_f32(q[n]).transpose(1, 2, 0, 3), _f32(k[n]), _f32(v[n]), keep)
        out[n] = o.transpose(2, 0, 1, 3)
    return [out, new_cache]


# ---- inputs --------------------------------------------------------------------------
def _np(dtype: str):
    from halo_mlir.kernels.registry import numpy_dtype

    return numpy_dtype(dtype)


def _cache_shape(v: dict, pages: int) -> tuple:
    return (pages, v["layers"], 2, v["kv_heads"], v["stride"], v["head_dim"])


def _common_inputs(v: dict, z: dict, rng):
    """Random cache, distinct shuffled page ids [N,B], a layer, lengths in [1, B*stride]."""
    n, nb = v["batch"], z["blocks"]
    total = max(z["pages"], n * nb)
    cache = rng.standard_normal(_cache_shape(v, total)).astype(_np(v["dtype"]))
    pages = rng.permutation(total)[:n * nb].reshape(n, nb).astype(np.int64)
    layer = np.array([rng.integers(0, v["layers"])], np.int64)
    lens = rng.integers(1, nb * v["stride"] + 1, n).astype(np.int64)
    return cache, pages, layer, lens


def _decode_args(v, z):
    n, kvh, g, d, dt = v["batch"], v["kv_heads"], v["group"], v["head_dim"], v["dtype"]
    total = max(z["pages"], n * z["blocks"])
    return ([Arg("q", (n, kvh, g, d), dt), Arg("cache", _cache_shape(v, total), dt),
             Arg("k_rows", (n, z["blocks"], 3), "i64"), Arg("v_rows", (n, z["blocks"], 3), "i64"),
             Arg("seq_lens", (n,), "i64")],
            [Arg("out", (n, kvh, g, d), dt)])


def decode_rows(pages: np.ndarray, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """pages[N,B] of `layer` -> the kernel's (k_rows, v_rows) [N,B,3]: (page, layer, k/v)."""
    def rows(kv):
        r = np.empty((*pages.shape, 3), np.int64)
        r[..., 0], r[..., 1], r[..., 2] = pages, layer, kv
        return r
    return rows(0), rows(1)


def _decode_inputs(v, z, rng):
    cache, pages, layer, lens = _common_inputs(v, z, rng)
    q = rng.standard_normal((v["batch"], v["kv_heads"], v["group"], v["head_dim"]))
    return [q.astype(_np(v["dtype"])), cache, *decode_rows(pages, int(layer[0])), lens]


def _decode_fp8_args(v, z):
    args, results = _decode_args(v, z)
    cache = args[1]
    args[1] = Arg("cache", cache.shape, FP8)
    return args + [Arg("k_scale", (), "f32"), Arg("v_scale", (), "f32")], results


def _decode_fp8_inputs(v, z, rng):
    q, cache, k_rows, v_rows, lens = _decode_inputs(v, z, rng)
    cache = cache.astype(np.float32).astype(_np(FP8))
    return [q, cache, k_rows, v_rows, lens, np.array([0.5], np.float32),
            np.array([0.25], np.float32)]


def _prefill_args(v, z):
    n, kvh, g, d, dt = v["batch"], v["kv_heads"], v["group"], v["head_dim"], v["dtype"]
    s = z["blocks"] * v["stride"]
    total = max(z["pages"], n * z["blocks"])
    return ([Arg("q", (n, s, kvh, g, d), dt), Arg("k", (n, kvh, s, d), dt),
             Arg("v", (n, kvh, s, d), dt), Arg("seq_lens", (n,), "i64"),
             Arg("cache", _cache_shape(v, total), dt), Arg("pages", (n, z["blocks"]), "i64"),
             Arg("layer", (), "i64")],
            [Arg("out", (n, s, kvh, g, d), dt), Arg("cache", _cache_shape(v, total), dt)])


def _prefill_inputs(v, z, rng):
    cache, pages, layer, lens = _common_inputs(v, z, rng)
    n, kvh, g, d = v["batch"], v["kv_heads"], v["group"], v["head_dim"]
    s = z["blocks"] * v["stride"]
    dt = _np(v["dtype"])
    q = rng.standard_normal((n, s, kvh, g, d)).astype(dt)
    k, vv = (rng.standard_normal((n, kvh, s, d)).astype(dt) for _ in range(2))
    return [q, k, vv, lens, cache, pages, layer]


_SIZES = {"blocks": (3, 64, "pages per row B (context = B * stride)"),
          "pages": (8, 0, "pages in the cache P (at least batch * blocks; 0: exactly that)")}

KERNELS = [
    Kernel("paged_decode_attention",
           "q[N,KVH,G,D], cache[P,layers,2,KVH,stride,D], k_rows/v_rows[N,B,3] (page, "
           "layer, k/v), seq_lens[N] -> [N,KVH,G,D]: one token per row over its pages",
           _params(4), derived=softmax_scale,
           harness=Harness(_SIZES, _decode_args, _decode_inputs, decode_reference,
                           lambda v: TOLERANCE[v["dtype"]])),
    Kernel("paged_decode_attention_fp8",
           "q[N,KVH,G,D], f8E4M3FNUZ cache[P,layers,2,KVH,stride,D], k_rows/v_rows[N,B,3], "
           "seq_lens[N], k_scale, v_scale f32 -> [N,KVH,G,D]: an FP8 KV cache, k_scale folded "
           "into the softmax scale, v_scale on the output",
           _params(4), derived=softmax_scale,
           harness=Harness(_SIZES, _decode_fp8_args, _decode_fp8_inputs, decode_fp8_reference,
                           lambda v: TOLERANCE[v["dtype"]])),
    Kernel("paged_prefill_attention",
           "q[N,S,KVH,G,D], k/v[N,KVH,S,D], seq_lens[N], cache, pages[N,S/stride], layer i64 "
           "-> ([N,S,KVH,G,D], cache with the K/V written): causal + padding mask",
           _params(1), derived=softmax_scale,
           harness=Harness({"blocks": (2, 16, "pages per row B (S = B * stride)"),
                            "pages": (6, 0, "pages in the cache P (at least batch * blocks; 0: exactly that)")},
                           _prefill_args, _prefill_inputs, prefill_reference,
                           lambda v: TOLERANCE[v["dtype"]])),
]
