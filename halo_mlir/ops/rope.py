"""Rotary position embedding (half-split `rotate_half` convention, HF order)."""

from __future__ import annotations

import math

import numpy as np

from halo_mlir.ir_builder import Builder, Value


def inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """Per-pair inverse frequencies [head_dim/2], f32, as HF's `rope_type` default/llama3."""
    freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    freq = freq.astype(np.float32)
    if scaling is None:
        return freq
    factor = scaling["factor"]
    lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freq
    scaled = np.where(wavelen > old_ctx / lo, freq / factor, freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope(b: Builder, x: Value, positions: Value, freqs: Value, *, dtype: str) -> Value:
    """x[N,S,H,D], positions[N,S] i64, freqs[D/2] f32 -> [N,S,H,D].

    out = x * cos(p*f) + rotate_half(x) * sin(p*f), rotate_half(x) = (-x2, x1), in f32.
    """
    n, s, h, d = b.dims(x)
    half = d // 2
    pairs = b.reshape(x, [[0], [1], [2], [3, 4]], [n, s, h, 2, half])
    x1 = b.slice(pairs, [0, 0, 0, 0, 0], [n, s, h, 1, half])
    x2 = b.slice(pairs, [0, 0, 0, 1, 0], [n, s, h, 1, half])
    x1 = b.reshape(x1, [[0], [1], [2], [3, 4]], [n, s, h, half])
    x2 = b.reshape(x2, [[0], [1], [2], [3, 4]], [n, s, h, half])

    def body(xe, x1e, x2e, pos, f, _):
        first = b.cmpi("eq", b.linalg_index(3), b.index(0))
        rotated = b.select(first, b.negf(b.cast(x2e, "f32")), b.cast(x1e, "f32"))
        angle = b.mulf(b.cast(pos, "f32"), f)
        return b.cast(b.addf(b.mulf(b.cast(xe, "f32"), b.cos(angle)),
                             b.mulf(rotated, b.sin(angle))), dtype)

    out = b.generic("bshkj,bshj,bshj,bs,j->bshkj", [pairs, x1, x2, positions, freqs],
                    [b.empty([n, s, h, 2, half], dtype)], body)
    return b.reshape(out, [[0], [1], [2], [3, 4]], [n, s, h, d])
