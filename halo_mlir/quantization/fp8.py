"""FP8 models (`--dtype fp8`): MI300X's f8E4M3FNUZ with per-tensor or per-channel scales.

The parameter names are sharktank's (its quark importer writes them), so a module emitted
here reads an FP8 dataset laid out that way, and ours reads the same:

- `KEY:qs` f8E4M3FNUZ [out, in] and `KEY:d` f32 []: a linear weight KEY
  (`blk.{i}.{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down}.weight`),
  w = qs * d;
- `blk.{i}.{linear}.q_input:rscale` f32 []: that linear's input x = q * rscale (the input
  is quantized as q = x / rscale before the FP8 matmul);
- `blk.{i}.attn_q.q_output:rscale` f32 []: the queries (after RoPE) entering attention;
- `blk.{i}.kv_cache.quantizer:rscale` f32 []: keys (after RoPE) and values, as stored in
  an fp8 KV cache.

Token embedding, norms and lm_head (`output.weight`) stay in the activation dtype (f16).
A scale is amax / FP8_MAX (the fnuz format's largest finite value is 240).

Weight scales come in one of two schemes (`SCALES`), fixed at import
(`import-params --fp8-scales`) and at emission (`emit --fp8-scales`):
- `per-tensor` (the default): `KEY:d` f32 [], one scale for the whole weight;
- `per-channel`: `KEY:d_rows` f32 [out], one scale per output row (amax of the row / 240),
  applied after the contraction: out[m, n] = acc[m, n] * x_rscale * d_rows[n].
The two schemes store their scales under different keys, so a module emitted for one scheme
never reads the other's scales (a missing-parameter error at load instead of wrong numbers).
"""

from __future__ import annotations

import numpy as np

FP8 = "f8E4M3FNUZ"
FP8_MAX = 240.0
SCALES = ("per-tensor", "per-channel")
ROW_SCALE_FIELD = "d_rows"
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# Mixture-of-experts stacks [experts, out, in] kept in fp8: `KEY:qs` [experts, out, in],
# `KEY:d` f32 [experts] (per-tensor: one scale per expert) or `KEY:d_rows` f32 [experts,
# out] (per-channel), and one input scale shared by the experts (`q_input:rscale` []). The
# router (`ffn_gate_inp`) stays in floats.
EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
# Which tensor each linear's input is (the q/k/v projections share attn_norm's output).
INPUT_OF = {"attn_q": "attn_norm", "attn_k": "attn_norm", "attn_v": "attn_norm",
            "attn_output": "attention", "ffn_gate": "ffn_norm", "ffn_up": "ffn_norm",
            "ffn_down": "silu_mul"}


def weight_keys(key: str, scales: str = "per-tensor") -> tuple[str, str]:
    """(`KEY:qs`, the scale key) of linear weight KEY: `KEY:d` (per-tensor) or
    `KEY:d_rows` (per-channel)."""
    check_scales(scales)
    return f"{key}:qs", f"{key}:{'d' if scales == 'per-tensor' else ROW_SCALE_FIELD}"


def check_scales(scales: str) -> None:
    from halo_mlir.errors import HaloError

    if scales not in SCALES:
        raise HaloError(f"unknown --fp8-scales {scales!r}: choose one of {', '.join(SCALES)}")


def input_scale_key(layer, linear: str) -> str:
    return f"blk.{layer}.{linear}.q_input:rscale"


def q_scale_key(layer) -> str:
    return f"blk.{layer}.attn_q.q_output:rscale"


def kv_scale_key(layer) -> str:
    return f"blk.{layer}.kv_cache.quantizer:rscale"


def is_linear(key: str) -> bool:
    """Whether ABI key `blk.{i}.NAME.weight` is a linear that an FP8 model keeps in fp8."""
    parts = key.split(".")
    return len(parts) == 4 and parts[0] == "blk" and parts[2] in LINEARS and parts[3] == "weight"


def is_expert(key: str) -> bool:
    """Whether ABI key `blk.{i}.NAME.weight` is a stack of experts an FP8 model keeps in fp8."""
    parts = key.split(".")
    return len(parts) == 4 and parts[0] == "blk" and parts[2] in EXPERTS and parts[3] == "weight"


def numpy_fp8():
    import ml_dtypes

    return np.dtype(ml_dtypes.float8_e4m3fnuz)


def scale_of(amax: float) -> np.float32:
    """The per-tensor rscale for values up to `amax` (1.0 for an all-zero tensor)."""
    amax = float(amax)
    return np.float32(amax / FP8_MAX if amax > 0 and np.isfinite(amax) else 1.0)


def row_scales(amax: np.ndarray) -> np.ndarray:
    """`scale_of` of each row's amax: f32 [rows] (1.0 for an all-zero row)."""
    amax = np.asarray(amax, np.float64)
    ok = (amax > 0) & np.isfinite(amax)
    return np.where(ok, amax / FP8_MAX, 1.0).astype(np.float32)


def quantize(x: np.ndarray, rscale) -> np.ndarray:
    """x / rscale saturated to +-240, rounded to nearest even in f8E4M3FNUZ (as the emitted
    program does; -0 becomes +0: fnuz has no negative zero). `rscale` is a scalar, or one
    scale per row of a 2-d x ([rows]: per-channel weights)."""
    rscale = np.asarray(rscale, np.float32)
    if rscale.ndim == 1:
        rscale = rscale[:, None]
    q = np.clip(np.asarray(x, np.float32) / rscale, -FP8_MAX, FP8_MAX) + np.float32(0)
    return q.astype(numpy_fp8())


def dequantize(q: np.ndarray, rscale) -> np.ndarray:
    rscale = np.asarray(rscale, np.float32)
    return q.astype(np.float32) * (rscale[:, None] if rscale.ndim == 1 else rscale)


# ---- published checkpoints: OCP e4m3fn -> f8E4M3FNUZ, same bits --------------------------
# A checkpoint made for NVIDIA hardware stores OCP float8 e4m3fn (exponent bias 7, largest
# finite 448, NaN S.1111.111, a negative zero 0x80). f8E4M3FNUZ has bias 8 (largest finite
# 240, NaN 0x80, no negative zero), so a byte means exactly half its e4m3fn value in fnuz,
# subnormals included: the bits are kept and every scale that multiplies them is doubled
# (exact in f32). e4m3fn's -0 becomes +0 (0x80 is NaN in fnuz); its NaNs have no fnuz
# counterpart and are refused. fnuz's own 0x7F / 0xFF (+-240) are never produced.
FN_MAX = 448.0
FN_TO_FNUZ_SCALE = 2.0
FN_MAX_IN_FNUZ = FN_MAX / FN_TO_FNUZ_SCALE  # 224: where e4m3fn's inputs saturate, in fnuz
FN_NEG_ZERO = 0x80
FN_NAN = (0x7F, 0xFF)


def fn_nan_count(bits: np.ndarray) -> int:
    """How many bytes of an e4m3fn array (as uint8) are NaN (S.1111.111)."""
    bits = np.asarray(bits, np.uint8)
    return int(np.count_nonzero((bits & 0x7F) == 0x7F))


def fnuz_from_fn(bits: np.ndarray) -> np.ndarray:
    """e4m3fn bytes (uint8, no NaN: check `fn_nan_count` first) -> the f8E4M3FNUZ array of
    the same bits, -0 (0x80) as +0: each value is half the e4m3fn one."""
    bits = np.asarray(bits, np.uint8)
    return np.where(bits == FN_NEG_ZERO, np.uint8(0), bits).view(numpy_fp8())


def numpy_fp8_fn():
    import ml_dtypes

    return np.dtype(ml_dtypes.float8_e4m3fn)
