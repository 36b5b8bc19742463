"""What a model holds per device, from its config alone: parameters by kind and dtype
(docs/ABI.md's keys, sharded like `sharding_passes/plan.py`), KV-cache bytes, and the live
activation buffers of one call. The terms `plan` adds up (capacity.py) and the kernel
records read (kernel_records.py)."""

from __future__ import annotations

import dataclasses
import math

from halo_mlir.config import LlamaConfig
from halo_mlir.errors import HaloError, lookup
from halo_mlir.params.names import param_shapes
from halo_mlir.sharding_passes.plan import Split, weight_sharding

GB = 1e9

# ---------------------------------------------------------------------------------------
# Dtypes
# ---------------------------------------------------------------------------------------

ELEM_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "fp8": 1}


@dataclasses.dataclass(frozen=True)
class DtypeSpec:
    """What `--dtype X` means for storage and compute."""
    matmul_weight: str   # dtype of the block matmul weights (q/k/v/o/gate/up/down)
    other_weight: str    # norms, token embedding, lm_head
    activation: str      # activations, logits, and the peak-rate column for non-block work
    kv_default: str      # KV-cache dtype when --kv-dtype is not given


DTYPES = {
    "f32": DtypeSpec("f32", "f32", "f32", "f32"),
    "f16": DtypeSpec("f16", "f16", "f16", "f16"),
    "bf16": DtypeSpec("bf16", "bf16", "bf16", "bf16"),
    "fp8": DtypeSpec("fp8", "f16", "f16", "fp8"),
}


def dtype_spec(dtype: str) -> DtypeSpec:
    return lookup(DTYPES, dtype, "--dtype")


# ---------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One parameter: ABI key, [out, in] shape, and kind ("matmul", "head", "embed", "norm")."""
    key: str
    shape: tuple[int, ...]
    kind: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def weight_kind(key: str, shape: tuple[int, ...]) -> str:
    """What a parameter is to the time model: `embed` (looked up), `head` (lm_head),
    `norm` (a vector), `expert` (stacked experts [E, out, in]) or `matmul`."""
    if key == "token_embd.weight":
        return "embed"
    if key == "output.weight":
        return "head"
    if len(shape) == 1:
        return "norm"
    return "expert" if "_exps." in key else "matmul"


def weight_inventory(cfg: LlamaConfig) -> list[Tensor]:
    """Every parameter tensor of the model (params.names.param_shapes: docs/ABI.md's keys),
    with its kind."""
    return [Tensor(k, s, weight_kind(k, s)) for k, s in param_shapes(cfg).items()]


def expert_fraction(cfg: LlamaConfig, tokens: int) -> float:
    """The share of a layer's experts a call reads for `tokens` tokens, each running
    `experts_per_token` of `n_experts` (routing taken as uniform and independent): the
    expected number of distinct experts picked, over the count. One token: k / E (Grok-1:
    2 of 8); many tokens: all of them. 1 for a dense FFN."""
    if not cfg.is_moe:
        return 1.0
    return 1.0 - (1.0 - cfg.experts_per_token / cfg.n_experts) ** tokens


def param_count(cfg: LlamaConfig) -> int:
    """Parameters of the whole model (a tied embedding counts once)."""
    return sum(t.numel for t in weight_inventory(cfg))


def shard_numel(t: Tensor, tp: int, moe: str = "ffn") -> int:
    """Elements of `t` on one device: split tensors hold 1/tp, replicated ones all of it
    (`moe`: how the experts split, plan.MOE_PARALLEL: 1/tp of every expert's rows, or
    E/tp whole experts; the same count either way)."""
    split = weight_sharding(t.key, t.shape, tp, moe=moe)
    return t.numel // tp if isinstance(split, Split) else t.numel


def experts_read(cfg: LlamaConfig, tp: int, tokens: int, moe: str = "ffn") -> float:
    """Experts' worth of weights one device reads for a call of `tokens` tokens. `ffn`:
    the share of every expert's rows it holds, of the experts the tokens pick
    (expert_fraction * E / tp); `expert`: each of its E/tp whole experts once (the emitted
    form runs every local expert over the call's tokens, weight 0 where a token did not
    pick it, so unpicked local experts are read too)."""
    if not cfg.is_moe:
        return 0.0
    if moe == "expert":
        return cfg.n_experts / tp
    return expert_fraction(cfg, tokens) * cfg.n_experts / tp


def weight_dtype(t: Tensor, spec: DtypeSpec) -> str:
    return spec.matmul_weight if t.kind in ("matmul", "expert") else spec.other_weight


def weight_bytes(cfg: LlamaConfig, tp: int = 1, dtype: str = "f16", moe: str = "ffn",
                 fp8_keys: frozenset[str] | None = None) -> int:
    """Bytes of parameters one device holds under the TP plan. `fp8_keys` (dtype fp8): the
    linears a published FP8 checkpoint stores in fp8; its other linears are in the float
    dtype (spec.other_weight). None: every block linear in fp8."""
    spec = dtype_spec(dtype)

    def width(t: Tensor) -> int:
        if fp8_keys is not None and t.kind in ("matmul", "expert") and t.key not in fp8_keys:
            return ELEM_BYTES[spec.other_weight]
        return ELEM_BYTES[weight_dtype(t, spec)]
    return sum(shard_numel(t, tp, moe) * width(t) for t in weight_inventory(cfg))


def weights_by_kind(cfg: LlamaConfig, tp: int, spec: DtypeSpec,
                     moe: str = "ffn") -> dict[str, tuple[int, int]]:
    """kind -> (elements, bytes) on one device."""
    out: dict[str, tuple[int, int]] = {}
    for t in weight_inventory(cfg):
        n = shard_numel(t, tp, moe)
        e, b = out.get(t.kind, (0, 0))
        out[t.kind] = (e + n, b + n * ELEM_BYTES[weight_dtype(t, spec)])
    return out


# ---------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------


def kv_bytes_per_token(cfg: LlamaConfig, tp: int = 1, kv_dtype: str = "f16") -> int:
    """KV-cache bytes one token occupies on one device (K and V of every layer)."""
    return cfg.page_elems(1, tp) * ELEM_BYTES[kv_dtype]


def pages_for(batch: int, seq_len: int, stride: int) -> int:
    """Pages that hold `batch` sequences of `seq_len` tokens (each rounded up to a page)."""
    return batch * -(-seq_len // stride)


# ---------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------



def activation_terms(cfg: LlamaConfig, *, tp: int, act_bytes: int, batch: int, q_len: int,
                     kv_len: int, attention: str = "fused", moe: str = "ffn") -> dict[str, int]:
    """Live buffers (bytes, one device) of one call: `batch` rows of `q_len` new tokens
    attending to `kv_len` positions. T = batch * q_len tokens.

    - hidden: the residual stream and its normed copy, 2 * T * hidden;
    - qkv: this device's q, k and v heads, T * (heads + 2*kv_heads)/tp * head_dim;
    - kv_gathered: K and V read back from the pages for attention, 2 * batch * kv_heads/tp *
      kv_len * head_dim;
    - attn_out: T * heads/tp * head_dim;
    - scores: fused attention (iree_linalg_ext.attention) keeps only its [batch, q_len,
      kv_len] mask (i1, stored as 1 byte); decomposed attention holds f32 scores and
      probabilities [batch, heads/tp, q_len, kv_len] for one block;
    - ffn: gate and up (silu(gate)*up is fused into their consumer), 2 * T * ffn/tp; a
      mixture of experts: of each token's k experts, or with `moe` `expert` of each of the
      device's E/tp whole experts (2 * T * E/tp * ffn);
    - logits: T * vocab; the vocab-split logits are gathered on device 0, so that device
      holds all of them.
    All in the activation dtype except the mask and decomposed scores. Matmul accumulators
    (f32) and dtype casts are fused by the compiler and not counted.
    """
    from halo_mlir.model.decoder import ATTENTION_FORMS

    forms = [f for f in ATTENTION_FORMS if f != "auto"]  # the emitted forms
    if attention not in forms:
        raise HaloError(f"unknown attention {attention!r}: choose one of {', '.join(forms)}")
    t, a, d = batch * q_len, act_bytes, cfg.head_dim
    heads, kvh = cfg.n_heads // tp, cfg.n_kv_heads // tp
    scores = (batch * q_len * kv_len if attention != "decomposed"
              else 2 * batch * heads * q_len * kv_len * 4)
    return {
        "hidden": 2 * t * cfg.hidden_size * a,
        "qkv": t * (heads + 2 * kvh) * d * a,
        "kv_gathered": 2 * batch * kvh * kv_len * d * a,
        "attn_out": t * heads * d * a,
        "scores": scores,
        "ffn": (2 * t * (cfg.n_experts // tp) * cfg.ffn_dim * a if moe == "expert" else
                2 * t * max(cfg.experts_per_token, 1) * (cfg.ffn_dim // tp) * a),
        "logits": t * cfg.vocab_size * a,
    }
