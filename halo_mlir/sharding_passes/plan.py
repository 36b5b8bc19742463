"""The tensor-parallel plan: pure data saying how each weight and the KV cache split.

Like gpt-fast's `tp.py`: q/k/v/gate/up split by output rows ("colwise"), attn_output/down
by input columns ("rowwise", leaving partial sums to all-reduce), norms and embeddings
replicated, the KV cache by kv heads, lm_head by vocab rows.
"""

from __future__ import annotations

import dataclasses
import re

from halo_mlir.config import LlamaConfig
from halo_mlir.errors import HaloError


@dataclasses.dataclass(frozen=True)
class Replicated:
    def __str__(self):
        return "replicated"


@dataclasses.dataclass(frozen=True)
class Split:
    """Split along `dim` in `tp` equal contiguous pieces. When `dim` is a flattening of
    `factors` (e.g. a cache page [layers, 2, kv_heads, stride, head_dim]), the split is of
    factor `at`; plain splits have factors () and at 0."""
    dim: int
    factors: tuple[int, ...] = ()
    at: int = 0

    def __str__(self):
        extra = f", factors={list(self.factors)}, at={self.at}" if self.factors else ""
        return f"split(dim={self.dim}{extra})"


@dataclasses.dataclass(frozen=True)
class Partial:
    """Each device holds a partial sum; the true value is their sum."""

    def __str__(self):
        return "partial"


@dataclasses.dataclass(frozen=True)
class Local:
    """Each device holds its own value, of full shape, that is neither a copy of the others
    nor a part of a sum (a row's amax over the device's own columns: the dynamic fp8 scale
    of a row-parallel linear's input). Ops combine it with the device's other values; it is
    never summed or gathered."""

    def __str__(self):
        return "local"


REPLICATED = Replicated()
PARTIAL = Partial()
LOCAL = Local()

# weight name (the part after `blk.N.`) -> how it splits; anything unlisted is replicated.
WEIGHT_STYLES = {
    "attn_q.weight": Split(0),
    "attn_k.weight": Split(0),
    "attn_v.weight": Split(0),
    "ffn_gate.weight": Split(0),
    "ffn_up.weight": Split(0),
    "attn_output.weight": Split(1),
    "ffn_down.weight": Split(1),
    # Mixture of experts: each expert's ffn rows split like the dense FFN ([experts, ffn,
    # hidden] / [experts, hidden, ffn]); the router (`ffn_gate_inp`) is replicated.
    "ffn_gate_exps.weight": Split(1),
    "ffn_up_exps.weight": Split(1),
    "ffn_down_exps.weight": Split(2),
    "output.weight": Split(0),
}
# How a mixture-of-experts model's experts split under --tp (`--moe-parallel`): `ffn` (the
# default) as WEIGHT_STYLES above; `expert` keeps whole experts on each device, the stacked
# experts split along the expert dim (E/N experts per device).
MOE_PARALLEL = ("ffn", "expert")
EXPERT_STYLES = {name: Split(0) for name in
                 ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")}
_BLOCK = re.compile(r"^blk\.\d+\.(.+)$")
_STACKED = re.compile(r"^blk\.(.+)\.stacked$")  # [layers, ...]: split one dim further in


def weight_sharding(key: str, shape=None, tp: int | None = None, moe: str = "ffn"):
    """How `key` splits (`moe`: a MOE_PARALLEL mode, for the experts). lm_head (`output.weight`) stays replicated when tp does not divide
    the vocabulary (every device then computes all logits). A field `KEY:FIELD` of a
    quantized weight splits like KEY, except scalars (per-tensor scales: `[]`, or `[layers]`
    when stacked), which are replicated, and fields without KEY's split dim: per-row scales
    `KEY:d_rows` [out] split with the rows of a weight split by rows (q/k/v/gate/up) and are
    replicated whole for one split by columns (attn_output/down)."""
    key, sep, _ = key.partition(":")
    if sep and shape is not None and len(shape) <= (1 if _STACKED.match(key) else 0):
        return REPLICATED
    styles = {**WEIGHT_STYLES, **EXPERT_STYLES} if moe == "expert" else WEIGHT_STYLES
    m = _STACKED.match(key)
    if m:
        s = styles.get(m.group(1), REPLICATED)
        s = Split(s.dim + 1) if isinstance(s, Split) else s
        return REPLICATED if sep and shape is not None and isinstance(s, Split) and \
            s.dim >= len(shape) else s
    m = _BLOCK.match(key)
    s = styles.get(m.group(1) if m else key, REPLICATED)
    if key == "output.weight" and shape is not None and tp and shape[0] % tp:
        return REPLICATED
    if sep and shape is not None and isinstance(s, Split) and s.dim >= len(shape):
        return REPLICATED
    return s


def shard_key(key: str, i: int, moe: str = "ffn") -> str:
    """Rank i's piece of the split weight `key`: `KEY.shard.i`; under expert parallelism
    the experts' pieces (rank i's whole experts) are `KEY.expert_shard.i`. The two modes'
    expert pieces have the same byte size ([E/N, F, D] and [E, F/N, D]) and IREE loads a
    parameter of the right size whatever it holds, so the names differ: files of one mode
    given to the other's module are a missing parameter (runtime.Program names the fix)."""
    base = key.partition(":")[0]
    m = _STACKED.match(base) or _BLOCK.match(base)
    expert = moe == "expert" and m is not None and m.group(1) in EXPERT_STYLES
    return f"{key}.{'expert_shard' if expert else 'shard'}.{i}"


def cache_sharding(cfg: LlamaConfig, stride: int) -> Split:
    """The flat cache argument [pages, page_elems] splits by kv head inside each page."""
    return Split(1, (cfg.n_layers, 2, cfg.n_kv_heads, stride, cfg.head_dim), 2)


def check_moe_parallel(cfg: LlamaConfig, tp: int, moe: str) -> None:
    """`--moe-parallel`: a known mode; `expert` only for a mixture-of-experts model whose
    experts divide by tp (whole experts per device)."""
    if moe not in MOE_PARALLEL:
        raise HaloError(f"unknown --moe-parallel {moe!r}: choose one of {', '.join(MOE_PARALLEL)}")
    if moe != "expert":
        return
    if not cfg.is_moe:
        raise HaloError(f"--moe-parallel expert applies to mixture-of-experts models; "
                        f"{cfg.name} is dense ({cfg.family} family): drop --moe-parallel")
    if cfg.n_experts % tp:
        fits = [d for d in range(1, cfg.n_experts + 1) if cfg.n_experts % d == 0]
        raise HaloError(f"--tp {tp} does not divide the {cfg.n_experts} experts of {cfg.name} "
                        f"(--moe-parallel expert holds whole experts per device); use --tp "
                        f"among {fits}, or --moe-parallel ffn")


def check_divisible(cfg: LlamaConfig, tp: int, moe: str = "ffn") -> None:
    """Every split dimension must divide by tp: one clear error naming the first that doesn't."""
    if tp < 1:
        raise HaloError(f"--tp must be at least 1, got {tp}")
    check_moe_parallel(cfg, tp, moe)
    for what, size in (("kv heads", cfg.n_kv_heads), ("attention heads", cfg.n_heads),
                       *((("ffn dim", cfg.ffn_dim),) if moe == "ffn" else ()),
                       ("hidden size", cfg.hidden_size)):
        if size % tp:
            divisors = [d for d in range(1, size + 1) if size % d == 0 and d <= 64]
            raise HaloError(f"--tp {tp} does not divide the {what} ({size}) of {cfg.name}; "
                            f"use a TP degree among {divisors}")


def check_quantized_split(formats: dict[str, str], shapes: dict[str, tuple[int, ...]],
                          tp: int) -> None:
    """Kept-quantized weights (`KEY:FIELD` [N, K/block, ...], or [E, N, K/block, ...] for
    stacked experts) split like their matrices: output rows anywhere, input columns only at
    block boundaries. One error naming the first weight whose column split would cut a
    block."""
    from halo_mlir.quantization.blocks import quant_format

    for key, fmt_name in formats.items():
        fmt, shape = quant_format(fmt_name), shapes[key]
        s = weight_sharding(key, shape, tp)
        blocks = shape[-1] // fmt.block
        if tp > 1 and isinstance(s, Split) and s.dim == len(shape) - 1 and blocks % tp:
            raise HaloError(f"--tp {tp} would cut the {fmt.ggml} blocks of {key}: its "
                            f"{shape[-1]} input columns are {blocks} block(s) of {fmt.block}, "
                            f"which do not split {tp} ways; use a --tp that divides {blocks}, "
                            "or drop --keep-quantized (dequantized weights split anywhere)")
