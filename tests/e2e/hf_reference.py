"""The independent reference: HF transformers' LlamaForCausalLM with random weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# The awkward config from the core issue: GQA (6 heads, 2 kv heads), head_dim 16, llama3
# rope scaling with a short original context so the scaling changes most frequencies.
AWKWARD = dict(
    vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
    num_attention_heads=6, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
    max_position_embeddings=512, rope_theta=500000.0, tie_word_embeddings=False,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
)


def make_model(out_dir: Path, seed: int = 0, weight_std: float = 0.15, **overrides):
    """Random-weight LlamaForCausalLM saved as safetensors + config.json in out_dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**AWKWARD, **overrides}, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger-than-init weights so errors are not hidden by tiny logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(weight_std * torch.randn_like(p))
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def logits(model, tokens: list[int]) -> np.ndarray:
    """f32 logits [len(tokens), vocab] for one unpadded row."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([tokens], dtype=torch.long)).logits[0]
    return out.float().numpy()


def config_json(out_dir: Path) -> dict:
    return json.loads((out_dir / "config.json").read_text())


# ---- FP8 (`--dtype fp8`): the same quantize-dequantize applied to the HF model ---------
def fake_quant(x, rscale: float, roundings=None, pos_axis: int = 1):
    """x / rscale saturated to +-240, rounded to f8E4M3FNUZ, times rscale (torch)."""
    import torch

    y = (x.float() / rscale).clamp(-240.0, 240.0)
    if roundings is not None:
        return roundings(y, pos_axis) * rscale
    return y.to(torch.float8_e4m3fnuz).float() * rscale


def fake_quant_tokens(x, ub: float | None = None, roundings=None, chunks: int = 1,
                      pos_axis: int = 1):
    """Dynamic per-token fp8 (ops/fp8.quantize_tokens): each row of x (its last dim) divided
    by max(amax, 1e-12) bounded by `ub`, over 224 (e4m3fn's 448 in fnuz), saturated to
    +-224, rounded to f8E4M3FNUZ, times that scale. `chunks`: the row's columns split in that
    many equal parts, each with its own amax (a row-parallel linear's input over --tp
    devices)."""
    import torch

    out = []
    for part in x.float().chunk(chunks, dim=-1):
        amax = part.abs().amax(-1, keepdim=True).clamp_min(1e-12)
        if ub is not None:
            amax = amax.clamp_max(ub)
        scale = amax / 224.0
        y = (part / scale).clamp(-224.0, 224.0)
        q = roundings(y, pos_axis) if roundings is not None else \
            y.to(torch.float8_e4m3fnuz).float()
        out.append(q * scale)
    return torch.cat(out, -1)


class Roundings:
    """The fp8 roundings of `fp8_model`'s forward passes, numbered in call order (site).

    An element whose value before rounding lies within `tol` (relative) of the midpoint
    between two fp8 values is *near*: f32 summation order or FMA contraction (the CPU's
    vector code, the BLAS kernel) can put it on either side, so a program agreeing with the
    model to f32 rounding may round it the other way. Each forward records its near
    elements in `near` ({(site, index): (position, distance)}); those in `flips` are rounded to the
    other neighbour. An index is the element's full index (positions absolute), so a key
    names the same element in every prefix of a sequence. Call `start` before each forward."""

    def __init__(self, tol: float = 0.0, flips=()):
        import ml_dtypes
        import torch

        self.tol, self.flips, self.near, self.site = tol, set(flips), {}, 0
        grid = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fnuz).astype(np.float32)
        self.grid = torch.from_numpy(np.unique(grid[np.isfinite(grid)]))

    def start(self, flips=()):
        self.flips, self.near, self.site = set(flips), {}, 0

    def __call__(self, y, pos_axis: int):
        import torch

        site, self.site = self.site, self.site + 1
        q = y.to(torch.float8_e4m3fnuz).float()
        if not self.tol and not self.flips:
            return q
        i = torch.searchsorted(self.grid, q.contiguous())
        side = torch.sign(y - q).long()
        alt = self.grid[(i + side).clamp(0, len(self.grid) - 1)]
        dist = (y - (q + alt) / 2).abs() / y.abs().clamp_min(1e-30)
        near = (side != 0) & (dist <= self.tol)
        for idx in map(tuple, torch.nonzero(near).tolist()):
            self.near[(site, idx)] = (idx[pos_axis], float(dist[idx]))
        mine = [idx for s, idx in self.flips if s == site and all(a < b for a, b in
                                                                    zip(idx, y.shape))]
        if mine:
            q = q.clone()
            for idx in mine:
                q[idx] = alt[idx]
        return q


def fp8_model(model, params: dict, *, fused: bool = True, roundings: Roundings | None = None,
              input_scales: str = "static", ub: float | None = None, tp: int = 1,
              fp8_cache: bool = True):
    """A copy of `model` computing as halo's `--dtype fp8` program with the FP8 parameters
    `params` (key -> numpy array, halo_mlir.quantization.fp8 names): linear weights are their fp8 values
    times `:d` (per-tensor) or each row times its `:d_rows` entry (per-channel); each linear's input is fake-quantized with its `q_input:rscale`; Q (after
    RoPE) with `attn_q.q_output:rscale`, K and V with `kv_cache.quantizer:rscale` (as the
    fp8 cache holds them). `fused`: as `iree_linalg_ext.attention` computes with fp8 V, the
    softmax weights exp(s - max) are rounded to fp8 before P @ V (their sum is not).
    `roundings`: a `Roundings` that does every fp8 rounding (to find and flip near-midpoint
    elements; kept as `m.fp8_roundings`). `input_scales="dynamic"`: each linear's input
    fake-quantized per token instead (fake_quant_tokens, bounded by `ub`; under `tp` devices
    the row-parallel linears' (o, down) inputs per device's columns). `fp8_cache=False`:
    attention in floats (a cache in the activation dtype)."""
    import copy

    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.models.llama import modeling_llama

    from halo_mlir.quantization import fp8

    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    m = copy.deepcopy(model)

    def scalar(key):
        return float(np.asarray(params[key], np.float32).reshape(()))

    for i, layer in enumerate(m.model.layers):
        for mod_name, mod in [*layer.self_attn.named_children(), *layer.mlp.named_children()]:
            if mod_name not in names:
                continue
            key = f"blk.{i}.{names[mod_name]}.weight"
            qs = np.asarray(params[f"{key}:qs"]).view(fp8.numpy_fp8()).reshape(mod.weight.shape)
            d = np.asarray(params[f"{key}:d_rows"], np.float32) if f"{key}:d_rows" in params \
                else scalar(f"{key}:d")
            with torch.no_grad():
                mod.weight.copy_(torch.from_numpy(fp8.dequantize(qs, d)))
            if input_scales == "dynamic":
                chunks = tp if mod_name in ("o_proj", "down_proj") else 1
                mod.register_forward_pre_hook(
                    lambda _m, args, c=chunks: (fake_quant_tokens(args[0], ub, roundings, c),))
                continue
            rs = scalar(fp8.input_scale_key(i, names[mod_name]))
            mod.register_forward_pre_hook(
                lambda _m, args, rs=rs: (fake_quant(args[0], rs, roundings),))

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **_):
        # In the program's order: fp8 values unscaled, q and k's scales folded into the
        # softmax scale, v's applied to the normalized output.
        i = module.layer_idx
        q_rs, kv_rs = scalar(fp8.q_scale_key(i)), scalar(fp8.kv_scale_key(i))
        groups = query.shape[1] // key.shape[1]
        q = fake_quant(query, q_rs, roundings, 2) / q_rs
        k = modeling_llama.repeat_kv(fake_quant(key, kv_rs, roundings, 2) / kv_rs, groups)
        v = modeling_llama.repeat_kv(fake_quant(value, kv_rs, roundings, 2) / kv_rs, groups)
        scale = np.float32(scaling) * (np.float32(q_rs) * np.float32(kv_rs))
        scores = (q @ k.transpose(2, 3)) * float(scale)
        if attention_mask is not None:
            scores = scores + attention_mask
        p = torch.exp(scores - scores.amax(-1, keepdim=True))
        denom = p.sum(-1, keepdim=True)
        if fused:  # the fused op multiplies P by V in V's type: P rounded to fp8
            p = roundings(p, 2) if roundings is not None else p.to(torch.float8_e4m3fnuz).float()
        return ((p @ v) / denom * kv_rs).transpose(1, 2).contiguous(), None

    m.fp8_roundings = roundings
    if not fp8_cache:
        return m
    # registered per model: the registry is global, and a second model's attention (its
    # own scales, fused or not) must not replace this one's
    name = f"halo_fp8_{id(m)}"
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    m.config._attn_implementation = name
    return m


# ---- Mixtral (mixture of experts) --------------------------------------------------
# Awkward sizes: 6 experts top-2, GQA 6/2 heads, head_dim 16, hidden 96, expert ffn 64.
MIXTRAL_AWKWARD = dict(
    vocab_size=300, hidden_size=96, intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=6, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
    max_position_embeddings=512, rope_theta=1e6, tie_word_embeddings=False,
    num_local_experts=6, num_experts_per_tok=2,
)


def make_mixtral(out_dir: Path, seed: int = 0, weight_std: float = 0.15,
                 router_std: float = 0.5, **overrides):
    """Random-weight MixtralForCausalLM saved as safetensors + config.json in out_dir. The
    router's weights are larger than the rest so tokens disagree on their experts."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(**{**MIXTRAL_AWKWARD, **overrides}, attn_implementation="eager")
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("gate.weight"):  # the router
                p.copy_(router_std * torch.randn_like(p))
            else:
                p.copy_(weight_std * torch.randn_like(p))
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def router_choices(model, tokens: list[int]) -> list[np.ndarray]:
    """Per layer, the experts each token picks [len(tokens), k] (transformers' router)."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([tokens], dtype=torch.long), output_router_logits=True)
    k = model.config.num_experts_per_tok
    return [torch.topk(torch.softmax(r.float(), -1), k, dim=-1).indices.numpy()
            for r in out.router_logits]


def fp8_errors_with_flips(ref, results, bound: float, max_flips: int):
    """Per result (logits [n, vocab] for the last n tokens of seq): its |logit error| per
    position against the fp8 reference `ref` (made with a `Roundings`), after rounding the
    other way the fewest near-midpoint elements (greedily, at most `max_flips` a sequence)
    that bring every position within `bound`. A result starts from the flips of the last
    earlier result whose tokens it extends (a decode step from its prefill's), or from none
    where those fail. Returns
    [(errors [n], {key: (position, relative distance to the midpoint)} flipped)]."""
    rd = ref.fp8_roundings
    out, done = [], []

    def error(got, seq, flips):
        rd.start(flips)
        return np.abs(got - logits(ref, seq)[-len(got):]).max(-1), dict(rd.near)

    def search(got, seq, flips):
        err, near = error(got, seq, flips)
        while np.any(err >= bound) and len(flips) < max_flips:
            first = int(np.argmax(err >= bound))
            pos = len(seq) - len(got) + first
            best = None
            for key, (p, dist) in near.items():
                if p > pos or key in flips:
                    continue
                e, n = error(got, seq, {**flips, key: (p, dist)})
                score = (int(np.argmax(e >= bound)) if np.any(e >= bound) else len(e), -e[first])
                if score > (first, -err[first]) and (best is None or score > best[0]):
                    best = (score, key, (p, dist))
            if best is None:
                break
            flips[best[1]] = best[2]
            err, near = error(got, seq, flips)
        return err, flips

    for got, seq in results:
        # BLAS kernels can differ with the sequence length: the inherited flips may be wrong.
        err, flips = search(got, seq, next((dict(f) for s, f in reversed(done)
                                            if seq[:len(s)] == s), {}))
        if np.any(err >= bound) and flips:
            err, flips = search(got, seq, {})
        out.append((err, flips))
        done.append((list(seq), flips))
    return out
