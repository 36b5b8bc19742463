"""Capacity planner: will a model fit, how much KV cache is left, and how fast could it run.

Pure arithmetic over a `LlamaConfig`, a GPU spec and the serving knobs (`--tp`, `--dtype`,
`--max-seq-len`, `--batch`); nothing is compiled or run. Every figure is PER DEVICE (one
GPU, or one partition in CPX mode) because that is what runs out first. Units: bytes, FLOPs,
seconds; "GB" in messages and tables means 1e9 bytes, as GPU vendors state capacity.

The model, term by term (each term is one function below):

- weights: the tensors of docs/ABI.md's parameter list, sharded like `sharding_passes/plan.py`
  (q/k/v/gate/up/attn_output/down and lm_head split by `tp`, norms and the token embedding
  replicated; tied embeddings have no separate lm_head). Element widths by `--dtype`:
  f32 4 bytes, f16/bf16 2; fp8 stores the block matmul weights in 1 byte and keeps norms,
  the token embedding and lm_head in f16 (as Meta's and AMD Quark's FP8 Llama checkpoints
  do: lm_head stays unquantized), and computes activations in f16 (docs/ABI.md: an fp8
  model's activation dtype defaults to f16).
- KV cache: `batch` sequences of `max_seq_len` tokens, each rounded up to whole pages of
  `block_seq_stride` tokens; a page holds `page_elems = layers*2*(kv_heads/tp)*stride*
  head_dim` elements per device (docs/ABI.md). The cache dtype defaults to the activation
  dtype, and to fp8 for fp8 models (docs/ABI.md's `CDT`).
- activations: the peak of live buffers inside one transformer block (buffers are reused
  block to block), plus the logits, for the larger of the two calls: a prefill of `batch`
  rows of `prefill_len` tokens, and a decode step of `batch` tokens at `max_seq_len`.
  See `activation_terms`.
- workspace: a flat `workspace_fraction` of the device memory (default 5%) for the HIP/IREE
  runtime, kernel scratch and allocator fragmentation.
- time: the step-time model of `halo-mlir cost` (cost_model.py) over the kernels and copies
  a call needs, built from the config by `call_records`: per kernel max(bytes / HBM
  bandwidth, FLOPs / peak) + a launch cost, per copy its bytes over a link + a fixed cost,
  per dependent cross-device step a latency (2 all-reduces per block: after attn_output and
  after ffn_down). `memory_s`/`compute_s` keep the whole call's plain roofline terms.
"""

from __future__ import annotations

import dataclasses
import math

from halo_mlir import cost_model
from halo_mlir.config import LlamaConfig
from halo_mlir.errors import HaloError
from halo_mlir.gpus import GPUS, GpuSpec, gpu_spec  # noqa: F401  (part of this API)
from halo_mlir.params.names import POST_NORMS
from halo_mlir.sharding_passes.plan import Split, check_divisible, weight_sharding

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


def _dtype_spec(dtype: str) -> DtypeSpec:
    try:
        return DTYPES[dtype]
    except KeyError:
        raise HaloError(f"unknown --dtype {dtype!r}: choose one of {', '.join(DTYPES)}") from None


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


def weight_inventory(cfg: LlamaConfig) -> list[Tensor]:
    """Every parameter tensor of the model, under its docs/ABI.md key. A mixture of experts
    has the router (`matmul`) and the stacked experts (kind `expert`, [experts, out, in])
    in place of the dense FFN, and Grok-1 its two post-norms."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.n_heads * d, cfg.n_kv_heads * d
    f, e = cfg.ffn_dim, cfg.n_experts
    ffn = [("ffn_gate_inp.weight", (e, h), "matmul"),
           ("ffn_gate_exps.weight", (e, f, h), "expert"),
           ("ffn_up_exps.weight", (e, f, h), "expert"),
           ("ffn_down_exps.weight", (e, h, f), "expert")] if cfg.is_moe else \
        [("ffn_gate.weight", (f, h), "matmul"), ("ffn_up.weight", (f, h), "matmul"),
         ("ffn_down.weight", (h, f), "matmul")]
    block = [("attn_norm.weight", (h,), "norm"), ("attn_q.weight", (q, h), "matmul"),
             ("attn_k.weight", (kv, h), "matmul"), ("attn_v.weight", (kv, h), "matmul"),
             ("attn_output.weight", (h, q), "matmul"), ("ffn_norm.weight", (h,), "norm"),
             *ffn,
             *((f"{name}.weight", (h,), "norm") for name in POST_NORMS.get(cfg.family, ()))]
    out = [Tensor("token_embd.weight", (cfg.vocab_size, h), "embed")]
    out += [Tensor(f"blk.{i}.{name}", shape, kind)
            for i in range(cfg.n_layers) for name, shape, kind in block]
    out.append(Tensor("output_norm.weight", (h,), "norm"))
    if not cfg.tie_embeddings:
        out.append(Tensor("output.weight", (cfg.vocab_size, h), "head"))
    return out


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


def _weight_dtype(t: Tensor, spec: DtypeSpec) -> str:
    return spec.matmul_weight if t.kind in ("matmul", "expert") else spec.other_weight


def weight_bytes(cfg: LlamaConfig, tp: int = 1, dtype: str = "f16", moe: str = "ffn") -> int:
    """Bytes of parameters one device holds under the TP plan."""
    spec = _dtype_spec(dtype)
    return sum(shard_numel(t, tp, moe) * ELEM_BYTES[_weight_dtype(t, spec)]
               for t in weight_inventory(cfg))


def _weights_by_kind(cfg: LlamaConfig, tp: int, spec: DtypeSpec,
                     moe: str = "ffn") -> dict[str, tuple[int, int]]:
    """kind -> (elements, bytes) on one device."""
    out: dict[str, tuple[int, int]] = {}
    for t in weight_inventory(cfg):
        n = shard_numel(t, tp, moe)
        e, b = out.get(t.kind, (0, 0))
        out[t.kind] = (e + n, b + n * ELEM_BYTES[_weight_dtype(t, spec)])
    return out


# ---------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------


def page_elems(cfg: LlamaConfig, tp: int = 1, stride: int = 32) -> int:
    """Elements of one KV page on one device: layers * 2 * (kv_heads/tp) * stride * head_dim."""
    return cfg.n_layers * 2 * (cfg.n_kv_heads // tp) * stride * cfg.head_dim


def kv_bytes_per_token(cfg: LlamaConfig, tp: int = 1, kv_dtype: str = "f16") -> int:
    """KV-cache bytes one token occupies on one device (K and V of every layer)."""
    return page_elems(cfg, tp, 1) * ELEM_BYTES[kv_dtype]


def pages_for(batch: int, seq_len: int, stride: int) -> int:
    """Pages that hold `batch` sequences of `seq_len` tokens (each rounded up to a page)."""
    return batch * -(-seq_len // stride)


# ---------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------

ATTENTION = ("paged", "fused", "decomposed")  # paged: the fused op over gathered pages


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
    if attention not in ATTENTION:
        raise HaloError(f"unknown attention {attention!r}: choose one of {', '.join(ATTENTION)}")
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


# ---------------------------------------------------------------------------------------
# Roofline
# ---------------------------------------------------------------------------------------

ALLREDUCE = ("auto", "one-shot", "reduce-scatter", "star")  # sharding_passes/collectives.py


def allreduce_seconds(tokens: int, hidden: int, act_bytes: int, tp: int, gpu: GpuSpec,
                      algorithm: str = "auto") -> float:
    """Seconds of one all-reduce of a [tokens, hidden] activation across `tp` devices on a
    fully connected node, as the sharding pass emits it (partial sums in the activation
    dtype, `act_bytes` each): the cost model's communication time of `allreduce_records`."""
    _, copies, steps = allreduce_records(tokens * hidden * act_bytes, tp, "f16", algorithm, gpu)
    return cost_model.estimate([], copies, gpu, dependent_steps=steps).comm_s if tp > 1 else 0.0


@dataclasses.dataclass(frozen=True)
class Roofline:
    """One call's time on one device. bytes_read: HBM bytes; flops: FLOPs; times in s.

    memory_s and compute_s are the whole call's bytes and FLOPs at the peak rates; the time
    itself (`seconds`) is the cost model's (cost_model.py), over the call's kernels and
    copies as `call_records` builds them: the same model `halo-mlir cost` applies to the
    compiled program."""
    tokens: int
    bytes_read: int
    flops: int
    memory_s: float
    compute_s: float
    comm_s: float
    estimate: cost_model.Estimate = dataclasses.field(repr=False, compare=False, default=None)
    dispatches: int = 0
    dependent_steps: int = 0

    @property
    def seconds(self) -> float:
        """The cost model's step time."""
        return self.estimate.seconds

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s >= self.compute_s else "compute"

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "bytes_read": self.bytes_read, "flops": self.flops,
                "memory_s": self.memory_s, "compute_s": self.compute_s, "comm_s": self.comm_s,
                "dispatches": self.dispatches, "dependent_steps": self.dependent_steps,
                "launch_s": self.estimate.launch_s, "seconds": self.seconds,
                "bound": self.bound}


def attention_flops(cfg: LlamaConfig, tp: int, pairs: int) -> int:
    """FLOPs of QK^T and PV on one device for `pairs` (query, key) pairs:
    2 matmuls * 2 FLOPs * heads/tp * head_dim per pair per block."""
    return 4 * cfg.n_layers * (cfg.n_heads // tp) * cfg.head_dim * pairs


def allreduce_records(size: int, tp: int, act: str, algorithm: str, gpu: GpuSpec):
    """(dispatches, copies, dependent steps) of one all-reduce of `size` bytes on device 0,
    in the forms of sharding_passes/collectives.py:

    one-shot: device 0 receives the tp-1 other partial sums at once, each over its own link,
    and adds them with the residual in one kernel (the matmul before it stays apart): 1 step.
    reduce-scatter: receives a 1/tp chunk from each peer and sums its chunk (one dispatch),
    then receives each peer's reduced chunk: 2 steps.
    star: every partial to device 0 over its own link, one add, the sum back: 2 steps.
    auto: one-shot up to `gpu.allreduce_oneshot_max_bytes`, else reduce-scatter (the
    emitter reduce-scatters every prefill, whose length is dynamic; the plan picks by the
    planned size)."""
    if algorithm not in ALLREDUCE:
        raise HaloError(f"unknown all-reduce {algorithm!r}: choose one of {', '.join(ALLREDUCE)}")
    if tp == 1:
        return [], [], 0
    if algorithm == "auto":
        algorithm = "one-shot" if size <= gpu.allreduce_oneshot_max_bytes else "reduce-scatter"
    peers = range(1, tp)
    if algorithm == "one-shot":
        adds = [cost_model.Dispatch("allreduce_sum", bytes_read=(tp + 1) * size,
                                    bytes_written=size, dtype=act)]
        return adds, [cost_model.Copy(0, size, peer=i) for i in peers], 1
    if algorithm == "reduce-scatter":
        part = size // tp
        adds = [cost_model.Dispatch("allreduce_add", bytes_read=tp * part, bytes_written=part,
                                    dtype=act)]
        return adds, [cost_model.Copy(0, part, peer=i, count=2) for i in peers], 2
    adds = [cost_model.Dispatch("allreduce_add", bytes_read=tp * size, bytes_written=size,
                                dtype=act)]
    return adds, [cost_model.Copy(0, size, peer=i) for i in peers], 2


def call_records(cfg: LlamaConfig, tp: int, spec: DtypeSpec, gpu: GpuSpec, *, batch: int,
                 q_len: int, pairs: int, kv_read: int, algorithm: str = "auto",
                 stride: int = 32, moe: str = "ffn"):
    """(dispatches, copies, dependent steps) of one call on device 0, built from the config
    as the emitter builds the program (what `halo-mlir cost` counts in the compiled one):

    a layer is 2 norms, 7 matmuls, RoPE of Q, the cache write (decode: the row's current
    page read and merged with the new K/V, then scattered back; prefill: K and V scattered),
    attention; a mixture of experts runs its experts' gate, up and down (`moe` `ffn`: the
    rows of each token's k experts; `expert`: every local expert over every token, as
    batched matmuls); an fp8 model quantizes the inputs of its 4 linear groups; at TP > 1 each of
    the layer's two all-reduces ends in a sum of the partials (fused with the residual add,
    not with the matmul). Per call: the embedding lookup, RoPE's cos/sin tables, the
    attention mask (decode: also every layer's gather rows), final norm and lm_head.
    `kv_read`: KV bytes the call reads, all layers."""
    D = cost_model.Dispatch
    t, h, d = batch * q_len, cfg.hidden_size, cfg.head_dim
    a = ELEM_BYTES[spec.activation]
    wb, ob = ELEM_BYTES[spec.matmul_weight], ELEM_BYTES[spec.other_weight]
    kvb = ELEM_BYTES[spec.kv_default]
    heads, kvh = cfg.n_heads // tp, cfg.n_kv_heads // tp
    decode = q_len == 1

    def quantize(cols):  # an fp8 model's linear input: activation -> fp8
        return [D("quantize", bytes_read=t * cols * a, bytes_written=t * cols, dtype="fp8")] \
            if spec.matmul_weight == "fp8" else []

    layer = [D("attn_norm", bytes_read=t * h * a + h * ob, bytes_written=t * h * a,
               dtype=spec.activation)]
    for t_ in weight_inventory(cfg.with_layers(1)):
        if t_.kind != "matmul":
            continue
        n, (out_rows, in_cols) = shard_numel(t_, tp), t_.shape
        split = weight_sharding(t_.key, t_.shape, tp)
        if isinstance(split, Split):  # [out, in] split by rows (dim 0) or columns (dim 1)
            out_rows, in_cols = (out_rows // tp, in_cols) if split.dim == 0 else \
                (out_rows, in_cols // tp)
        name = t_.key.split(".", 2)[-1]
        if name.startswith(("attn_q", "attn_output", "ffn_gate", "ffn_down")):
            layer += quantize(in_cols)
        layer.append(D(name, bytes_read=n * wb + t * in_cols * a,
                       bytes_written=t * out_rows * a, flops=2 * t * n,
                       dtype=spec.matmul_weight))
        if t_.key.endswith("attn_v.weight"):
            layer.append(D("rope_q", bytes_read=t * heads * d * a,
                           bytes_written=t * heads * d * a, dtype=spec.activation))
            if decode:  # read-modify-write of each row's current page (K and V blocks)
                page = batch * 2 * kvh * stride * d * kvb
                layer += [D("cache_page_merge", bytes_read=page + t * 2 * kvh * d * a,
                            bytes_written=page, dtype=spec.activation),
                          D("cache_page_scatter", bytes_read=page, bytes_written=page,
                            dtype=spec.activation)]
            else:
                layer += [D("cache_write", bytes_read=t * kvh * d * a,
                            bytes_written=t * kvh * d * kvb, dtype=spec.activation)] * 2
            layer.append(D("attention", bytes_read=kv_read // cfg.n_layers + t * heads * d * a,
                           bytes_written=t * heads * d * a,
                           flops=attention_flops(cfg, tp, pairs) // cfg.n_layers,
                           dtype=spec.activation))
        if t_.key.endswith("attn_output.weight"):
            layer.append(D("ffn_norm", bytes_read=t * h * a + h * ob, bytes_written=t * h * a,
                           dtype=spec.activation))
    k = cfg.experts_per_token
    for t_ in (x for x in weight_inventory(cfg.with_layers(1)) if x.kind == "expert"):
        n = shard_numel(t_, tp, moe)
        if moe == "expert":  # E/tp whole experts [E/tp, rows, cols], each over all t tokens
            local, rows, cols = cfg.n_experts // tp, t_.shape[1], t_.shape[2]
            layer.append(D(t_.key.split(".", 2)[-1], bytes_read=n * wb + t * local * cols * a,
                           bytes_written=t * local * rows * a, flops=2 * t * n,
                           dtype=spec.matmul_weight))
            continue
        # each token's k experts: the rows of the experts the call picks (expert_fraction)
        per_expert = n // cfg.n_experts
        rows = t_.shape[1] // (tp if t_.key.endswith(("gate_exps.weight", "up_exps.weight"))
                               else 1)
        cols = t_.shape[2] // (tp if t_.key.endswith("down_exps.weight") else 1)
        layer.append(D(t_.key.split(".", 2)[-1],
                       bytes_read=int(n * expert_fraction(cfg, t) * wb) + t * k * cols * a,
                       bytes_written=t * k * rows * a, flops=2 * t * k * per_expert,
                       dtype=spec.matmul_weight))
    layer += [D(name, bytes_read=2 * t * h * a + h * ob, bytes_written=t * h * a,
                dtype=spec.activation) for name in POST_NORMS.get(cfg.family, ())]
    adds, copies, steps = allreduce_records(t * h * a, tp, spec.activation, algorithm, gpu)
    layer += adds * 2
    dispatches = [dataclasses.replace(x, count=x.count * cfg.n_layers) for x in layer]
    copies = [dataclasses.replace(c, count=c.count * 2 * cfg.n_layers) for c in copies]
    steps *= 2 * cfg.n_layers
    head = next(x for x in weight_inventory(cfg)
                if x.kind == ("embed" if cfg.tie_embeddings else "head"))
    vocab_rows = shard_numel(head, tp) // h
    small = dict(bytes_read=t * 8, bytes_written=t * d * 4, dtype=spec.activation)  # tiny
    dispatches += [
        D("token_embd", bytes_read=t * h * ob, bytes_written=t * h * a, dtype=spec.activation),
        D("rope_cos", **small), D("rope_sin", **small), D("attention_mask", **small),
        *([D("decode_gather_rows", **small), D("decode_write_rows", **small)] if decode else []),
        D("output_norm", bytes_read=t * h * a + h * ob, bytes_written=t * h * a,
          dtype=spec.activation),
        D("lm_head", bytes_read=vocab_rows * h * ob + t * h * a,
          bytes_written=t * vocab_rows * a, flops=2 * t * vocab_rows * h,
          dtype=spec.activation)]
    if vocab_rows != cfg.vocab_size:  # vocab-split logits gathered on device 0
        copies += [cost_model.Copy(0, t * vocab_rows * a, peer=i) for i in range(1, tp)]
        steps += 1
    return dispatches, copies, steps


def _roofline(cfg, tp, spec, gpu, *, tokens, q_len, pairs, bytes_read, kv_read,
              algorithm, moe="ffn") -> Roofline:
    """Matmul weights run at the `--dtype` peak; lm_head and attention at the activation
    dtype's peak (fp8 models keep lm_head in f16). The token embedding is a lookup."""
    kinds = _weights_by_kind(cfg, tp, spec, moe)
    # a token runs k of a layer's E experts (expert parallelism: every local expert runs)
    share = 1.0 if moe == "expert" else cfg.experts_per_token / max(cfg.n_experts, 1)
    matmul = 2 * tokens * kinds["matmul"][0] + int(
        2 * tokens * kinds.get("expert", (0, 0))[0] * share)
    other = 2 * tokens * kinds.get("head", (0, 0))[0] + attention_flops(cfg, tp, pairs)
    if cfg.tie_embeddings:  # the embedding is also the lm_head (replicated)
        other += 2 * tokens * kinds["embed"][0]
    compute_s = (matmul / gpu.peak_flops[spec.matmul_weight]
                 + other / gpu.peak_flops[spec.activation])
    ds, cs, steps = call_records(cfg, tp, spec, gpu, batch=tokens // q_len, q_len=q_len,
                                 pairs=pairs, kv_read=kv_read, algorithm=algorithm, moe=moe)
    est = cost_model.estimate(ds, cs, gpu, dependent_steps=steps)
    return Roofline(tokens=tokens, bytes_read=bytes_read, flops=matmul + other,
                    memory_s=bytes_read / gpu.hbm_bytes_per_s, compute_s=compute_s,
                    comm_s=est.comm_s, estimate=est, dispatches=sum(d.count for d in ds),
                    dependent_steps=steps)


def _weights_read(cfg: LlamaConfig, tp: int, spec: DtypeSpec, tokens: int,
                  moe: str = "ffn") -> int:
    """Weight bytes a forward pass of `tokens` tokens streams from HBM: all but the token
    embedding, which is only looked up (unless tied, when it is also the lm_head), and of
    the experts what `experts_read` says."""
    kinds = _weights_by_kind(cfg, tp, spec, moe)
    skip = 0 if cfg.tie_embeddings else kinds["embed"][1]
    experts = kinds.get("expert", (0, 0))[1]
    held = cfg.n_experts / tp if cfg.is_moe else 1.0
    return (sum(b for _, b in kinds.values()) - skip - experts
            + int(experts * experts_read(cfg, tp, tokens, moe) / held))


def roofline_decode(cfg, tp, spec, gpu, *, batch, seq_len, kv_token_bytes,
                    algorithm="auto", moe="ffn") -> Roofline:
    """One decode step: `batch` tokens, each at position seq_len-1 attending to seq_len keys.
    Reads the weights once and every sequence's KV (seq_len tokens)."""
    kv = batch * seq_len * kv_token_bytes
    return _roofline(cfg, tp, spec, gpu, tokens=batch, q_len=1, pairs=batch * seq_len,
                     bytes_read=_weights_read(cfg, tp, spec, batch, moe) + kv, kv_read=kv,
                     algorithm=algorithm, moe=moe)


def roofline_prefill(cfg, tp, spec, gpu, *, batch, seq_len, kv_token_bytes,
                     algorithm="auto", moe="ffn") -> Roofline:
    """One prefill of `batch` rows of `seq_len` tokens with causal attention
    (seq_len*(seq_len+1)/2 pairs a row). Reads the weights, writes the KV."""
    kv = batch * seq_len * kv_token_bytes
    return _roofline(cfg, tp, spec, gpu, tokens=batch * seq_len, q_len=seq_len,
                     pairs=batch * seq_len * (seq_len + 1) // 2,
                     bytes_read=_weights_read(cfg, tp, spec, batch * seq_len, moe) + kv,
                     kv_read=0, algorithm=algorithm, moe=moe)


# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """Memory and speed of one configuration, per device. Bytes unless named otherwise."""
    cfg: LlamaConfig = dataclasses.field(repr=False, compare=False)
    gpu: GpuSpec = dataclasses.field(repr=False)
    tp: int
    dtype: str
    kv_dtype: str
    act_dtype: str
    batch: int
    max_seq_len: int
    prefill_len: int
    prefill_batch: int
    block_seq_stride: int
    attention: str
    allreduce: str
    workspace_fraction: float
    params: int                    # whole model
    weight_bytes: int
    page_bytes: int                # one KV page on one device
    kv_pages: int
    activation_terms: dict         # name -> bytes of the peak call
    activation_phase: str          # "prefill" or "decode": which call sets the peak
    workspace_bytes: int
    decode: Roofline
    prefill: Roofline
    moe_parallel: str = "ffn"      # how --tp splits the experts (plan.MOE_PARALLEL)

    @property
    def kv_bytes(self) -> int:
        return self.kv_pages * self.page_bytes

    @property
    def kv_token_bytes(self) -> int:
        return self.page_bytes // self.block_seq_stride

    @property
    def activation_bytes(self) -> int:
        return sum(self.activation_terms.values())

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes + self.workspace_bytes

    @property
    def capacity_bytes(self) -> int:
        return int(self.gpu.memory_bytes)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes

    @property
    def shortfall_bytes(self) -> int:
        """How far over capacity the plan is (0 when it fits)."""
        return max(0, self.total_bytes - self.capacity_bytes)

    @property
    def free_for_kv_bytes(self) -> int:
        """Memory left for KV pages after weights, activations and workspace (may be < 0)."""
        return (self.capacity_bytes - self.weight_bytes - self.activation_bytes
                - self.workspace_bytes)

    @property
    def max_pages(self) -> int:
        """The most KV pages (device_block_count) that fit next to everything else."""
        return max(0, self.free_for_kv_bytes // self.page_bytes)

    @property
    def max_tokens(self) -> int:
        """Tokens the largest cache holds, over all sequences."""
        return self.max_pages * self.block_seq_stride

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch / self.decode.seconds

    @property
    def experts(self) -> dict | None:
        """A mixture of experts: experts held per device (whole ones under expert
        parallelism, else every expert's 1/tp) and experts' worth of weights a decode step
        reads per device."""
        if not self.cfg.is_moe:
            return None
        e = self.cfg.n_experts
        return {"moe_parallel": self.moe_parallel, "experts": e,
                "whole_experts_held": e // self.tp if self.moe_parallel == "expert" else 0,
                "expert_share_held": 1.0 if self.moe_parallel == "expert" else 1 / self.tp,
                "decode_experts_read": experts_read(self.cfg, self.tp, self.batch,
                                                    self.moe_parallel)}

    def to_json(self) -> dict:
        """Plain-JSON summary for `--json` (bytes, seconds, FLOPs)."""
        def roof(r: Roofline) -> dict:
            return r.to_json()
        return {
            "model": self.cfg.name, "gpu": self.gpu.name, "tp": self.tp, "dtype": self.dtype,
            "kv_dtype": self.kv_dtype, "activation_dtype": self.act_dtype,
            "batch": self.batch, "max_seq_len": self.max_seq_len,
            "prefill_len": self.prefill_len, "prefill_batch": self.prefill_batch,
            "block_seq_stride": self.block_seq_stride,
            "attention": self.attention, "allreduce": self.allreduce,
            "params": self.params,
            **({"experts": self.experts} if self.experts else {}),
            "per_device": {
                "weight_bytes": self.weight_bytes,
                "kv_pages": self.kv_pages, "page_bytes": self.page_bytes,
                "kv_bytes": self.kv_bytes, "kv_bytes_per_token": self.kv_token_bytes,
                "activation_bytes": self.activation_bytes,
                "activation_phase": self.activation_phase,
                "activation_terms": dict(self.activation_terms),
                "workspace_bytes": self.workspace_bytes,
                "workspace_fraction": self.workspace_fraction,
                "total_bytes": self.total_bytes, "capacity_bytes": self.capacity_bytes,
                "fits": self.fits, "shortfall_bytes": self.shortfall_bytes,
                "max_pages": self.max_pages, "max_tokens": self.max_tokens,
            },
            "decode": {**roof(self.decode), "tokens_per_s": self.decode_tokens_per_s},
            "prefill": roof(self.prefill),
        }


def _check_knobs(tp, batch, max_seq_len, prefill_len, prefill_batch, stride,
                 workspace_fraction) -> None:
    for flag, value in (("--tp", tp), ("--batch", batch), ("--max-seq-len", max_seq_len),
                        ("--prefill-len", prefill_len), ("--prefill-batch", prefill_batch),
                        ("--block-seq-stride", stride)):
        if value < 1:
            raise HaloError(f"{flag} must be at least 1, got {value}")
    if not 0 <= workspace_fraction < 1:
        raise HaloError(f"workspace fraction must be in [0, 1), got {workspace_fraction}")


def plan(cfg: LlamaConfig, *, tp: int = 1, dtype: str = "f16", kv_dtype: str | None = None,
         max_seq_len: int | None = None, batch: int = 1, gpu: str = "mi300x",
         block_seq_stride: int = 32, workspace_fraction: float = 0.05,
         prefill_len: int | None = None, prefill_batch: int | None = None,
         attention: str = "fused", allreduce: str = "auto", moe_parallel: str = "ffn") -> Plan:
    """Plan `batch` sequences of up to `max_seq_len` tokens (default: the model's) on `tp`
    devices of kind `gpu`: the KV cache holds all of them and a decode step advances all of
    them. The prefill call counted for activations and timed takes `prefill_batch` rows
    (default `batch`) of `prefill_len` tokens (default `max_seq_len`, padded to a multiple
    of the stride as docs/ABI.md requires). `moe_parallel`: how --tp splits a mixture of
    experts (plan.MOE_PARALLEL)."""
    spec, dev = _dtype_spec(dtype), gpu_spec(gpu)
    kv_dtype = kv_dtype or spec.kv_default
    if kv_dtype not in ELEM_BYTES:
        raise HaloError(f"unknown --kv-dtype {kv_dtype!r}: choose one of {', '.join(ELEM_BYTES)}")
    if allreduce not in ALLREDUCE:
        raise HaloError(f"unknown --allreduce {allreduce!r}: choose one of {', '.join(ALLREDUCE)}")
    max_seq_len = max_seq_len or cfg.max_seq_len
    prefill_len = prefill_len or max_seq_len
    prefill_batch = prefill_batch or batch
    _check_knobs(tp, batch, max_seq_len, prefill_len, prefill_batch, block_seq_stride,
                 workspace_fraction)
    check_divisible(cfg, tp, moe_parallel)

    act = ELEM_BYTES[spec.activation]
    page_bytes = page_elems(cfg, tp, block_seq_stride) * ELEM_BYTES[kv_dtype]
    token_kv = kv_bytes_per_token(cfg, tp, kv_dtype)
    padded = -(-prefill_len // block_seq_stride) * block_seq_stride
    phases = {
        "prefill": activation_terms(cfg, tp=tp, act_bytes=act, batch=prefill_batch,
                                    q_len=padded, kv_len=padded, attention=attention,
                                    moe=moe_parallel),
        "decode": activation_terms(cfg, tp=tp, act_bytes=act, batch=batch, q_len=1,
                                   kv_len=max_seq_len, attention=attention, moe=moe_parallel),
    }
    phase = max(phases, key=lambda p: sum(phases[p].values()))
    return Plan(
        cfg=cfg, gpu=dev, tp=tp, dtype=dtype, kv_dtype=kv_dtype, act_dtype=spec.activation,
        batch=batch, max_seq_len=max_seq_len, prefill_len=prefill_len,
        prefill_batch=prefill_batch, block_seq_stride=block_seq_stride, attention=attention,
        allreduce=allreduce,
        workspace_fraction=workspace_fraction, params=param_count(cfg),
        weight_bytes=weight_bytes(cfg, tp, dtype, moe_parallel), page_bytes=page_bytes,
        kv_pages=pages_for(batch, max_seq_len, block_seq_stride),
        activation_terms=phases[phase], activation_phase=phase,
        workspace_bytes=int(workspace_fraction * dev.memory_bytes),
        decode=roofline_decode(cfg, tp, spec, dev, batch=batch, seq_len=max_seq_len,
                               kv_token_bytes=token_kv, algorithm=allreduce, moe=moe_parallel),
        prefill=roofline_prefill(cfg, tp, spec, dev, batch=prefill_batch,
                                 seq_len=prefill_len, kv_token_bytes=token_kv,
                                 algorithm=allreduce, moe=moe_parallel),
        moe_parallel=moe_parallel,
    )


def _replan(p: Plan, **changes) -> Plan:
    knobs = dict(tp=p.tp, dtype=p.dtype, kv_dtype=None, max_seq_len=p.max_seq_len,
                 batch=p.batch, gpu=p.gpu.name, block_seq_stride=p.block_seq_stride,
                 workspace_fraction=p.workspace_fraction, prefill_len=p.prefill_len,
                 prefill_batch=p.prefill_batch, attention=p.attention, allreduce=p.allreduce,
                 moe_parallel=p.moe_parallel)
    if p.kv_dtype != DTYPES[p.dtype].kv_default:  # keep an explicit --kv-dtype
        knobs["kv_dtype"] = p.kv_dtype
    knobs.update(changes)
    return plan(p.cfg, **knobs)


def _suggestion(p: Plan) -> str:
    """The cheapest change that makes `p` fit: a larger --tp, then fp8, then both."""
    larger = [t for t in range(p.tp + 1, p.cfg.n_kv_heads + 1) if p.cfg.n_kv_heads % t == 0
              and not any(s % t for s in (p.cfg.n_heads, p.cfg.hidden_size,
                                          p.cfg.n_experts if p.moe_parallel == "expert"
                                          else p.cfg.ffn_dim))]
    tries = [dict(tp=t) for t in larger]
    if p.dtype != "fp8":
        tries += [dict(dtype="fp8")] + [dict(tp=t, dtype="fp8") for t in larger]
    for change in tries:
        if _replan(p, **change).fits:
            flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in change.items())
            return f"use {flags} (fits), or lower --max-seq-len/--batch"
    best = _replan(p, tp=max([p.tp, *larger]), dtype="fp8")
    return (f"a larger --tp or --dtype fp8 alone is not enough (--tp {best.tp} --dtype fp8 "
            f"still needs {best.total_bytes / GB:,.1f} GB per device); also lower "
            "--max-seq-len or --batch")


def require_fit(p: Plan) -> Plan:
    """`p` if it fits; otherwise HaloError saying what is over by how much and what to change."""
    if p.fits:
        return p
    parts = {"weights": p.weight_bytes, "KV cache": p.kv_bytes,
             f"{p.activation_phase} activations": p.activation_bytes,
             "workspace": p.workspace_bytes}
    biggest = ", ".join(f"{k} {v / GB:,.1f}" for k, v in
                        sorted(parts.items(), key=lambda kv: -kv[1]))
    raise HaloError(
        f"{p.cfg.name} ({p.dtype}, --tp {p.tp}, --batch {p.batch}, --max-seq-len "
        f"{p.max_seq_len}) does not fit on {p.gpu.name}: needs {p.total_bytes / GB:,.1f} GB "
        f"per device of {p.capacity_bytes / GB:,.1f} GB, {p.shortfall_bytes / GB:,.1f} GB "
        f"short ({biggest} GB); {_suggestion(p)}")


# ---------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------


def _gb(n: float) -> str:
    return f"{n / GB:,.2f} GB"


def _times(*seconds: float, unit: str | None = None) -> list[str]:
    """Durations of one quantity in one unit: `unit` ("ms" or "s"), else seconds when the
    largest is at least 1 s, milliseconds below."""
    unit = unit or ("s" if max(seconds) >= 1 else "ms")
    scale = 1e3 if unit == "ms" else 1.0
    return [f"{t * scale:,.3f} {unit}" for t in seconds]


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def _experts_row(p: Plan) -> str:
    x, e = p.experts, p.cfg.n_experts
    read = f"a decode step reads {x['decode_experts_read']:.2f} experts' worth"
    if p.moe_parallel == "expert":
        return (f"--moe-parallel expert: {x['whole_experts_held']} of {e} whole experts per "
                f"device; {read} (every local expert, picked or not)")
    return (f"--moe-parallel ffn: 1/{p.tp} of each of the {e} experts per device; {read} "
            f"(the picked experts' rows, expected at batch {p.batch})")


def format_table(p: Plan) -> str:
    """A two-column text table of `p` (per device)."""
    d, f = p.decode, p.prefill
    seq_pages = pages_for(1, p.max_seq_len, p.block_seq_stride)
    decode_t, decode_comm = _times(d.seconds, d.comm_s, unit="ms")
    prefill_t, prefill_comm = _times(f.seconds, f.comm_s)
    rows = [
        ("model", f"{p.cfg.name} ({p.params:,} params), {p.dtype} weights, {p.kv_dtype} KV"),
        ("devices", f"{p.tp} x {p.gpu.name}"),
        ("request", f"batch {p.batch} x {p.max_seq_len:,} tokens, prefill {p.prefill_batch} x "
                    f"{p.prefill_len:,}, stride {p.block_seq_stride}"),
        ("weights", _gb(p.weight_bytes)),
        *([("experts", _experts_row(p))] if p.experts else []),
        ("KV cache", f"{_gb(p.kv_bytes)} ({p.kv_pages:,} pages x {p.page_bytes:,} B)"),
        ("activations", f"{_gb(p.activation_bytes)} (peak: {p.activation_phase})"),
        ("workspace", f"{_gb(p.workspace_bytes)} ({p.workspace_fraction:.0%} of capacity)"),
        ("total", _gb(p.total_bytes)),
        ("capacity", _gb(p.capacity_bytes)),
        ("fits?", "yes" if p.fits else f"NO: {_gb(p.shortfall_bytes)} short"),
        ("max pages", f"{p.max_pages:,} ({_plural(p.max_tokens, 'token')}, "
                      f"{_plural(p.max_pages // seq_pages, 'sequence')} of "
                      f"{_plural(p.max_seq_len, 'token')})"),
        # a step's time per token: always ms; a prefill: s when it takes a second or more
        ("decode step", f"{decode_t} ({d.bound}-bound, comm {decode_comm}), "
                        f"{p.decode_tokens_per_s:,.1f} tokens/s"),
        ("prefill", f"{prefill_t} ({f.bound}-bound, comm {prefill_comm}) for "
                    f"{_plural(f.tokens, 'token')}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"Capacity plan, per device ({p.gpu.description})"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)
