"""The kernels and copies one call of a model runs on one device, built from its config
(`call_records`: what `plan` estimates, the same kinds of records `cost` reads from the
compiled program), and their time under the step-time model (step_time.py)."""

from __future__ import annotations

import dataclasses

from halo_mlir.analysis import step_time
from halo_mlir.analysis.inventory import (ELEM_BYTES, DtypeSpec, expert_fraction,
                                          experts_read, shard_numel, weight_inventory,
                                          weights_by_kind)
from halo_mlir.config import LlamaConfig
from halo_mlir.errors import HaloError
from halo_mlir.params.names import POST_NORMS
from halo_mlir.sharding_passes.plan import Split, weight_sharding
from halo_mlir.toolchain.gpus import GpuSpec


# ---------------------------------------------------------------------------------------
# CallEstimate
# ---------------------------------------------------------------------------------------

ALLREDUCE = ("auto", "one-shot", "reduce-scatter", "star")  # sharding_passes/collectives.py


def allreduce_seconds(tokens: int, hidden: int, act_bytes: int, tp: int, gpu: GpuSpec,
                      algorithm: str = "auto") -> float:
    """Seconds of one all-reduce of a [tokens, hidden] activation across `tp` devices on a
    fully connected node, as the sharding pass emits it (partial sums in the activation
    dtype, `act_bytes` each): the cost model's communication time of `allreduce_records`."""
    _, copies, steps = allreduce_records(tokens * hidden * act_bytes, tp, "f16", algorithm, gpu)
    return step_time.estimate([], copies, gpu, dependent_steps=steps).comm_s if tp > 1 else 0.0


@dataclasses.dataclass(frozen=True)
class CallEstimate:
    """One call's time on one device. bytes_read: HBM bytes; flops: FLOPs; times in s.

    memory_s and compute_s are the whole call's bytes and FLOPs at the peak rates; the time
    itself (`seconds`) is the cost model's (step_time.py), over the call's kernels and
    copies as `call_records` builds them: the same model `halo-mlir cost` applies to the
    compiled program."""
    tokens: int
    bytes_read: int
    flops: int
    memory_s: float
    compute_s: float
    comm_s: float
    estimate: step_time.Estimate = dataclasses.field(repr=False, compare=False, default=None)
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
        adds = [step_time.Dispatch("allreduce_sum", bytes_read=(tp + 1) * size,
                                    bytes_written=size, dtype=act)]
        return adds, [step_time.Copy(0, size, peer=i) for i in peers], 1
    if algorithm == "reduce-scatter":
        part = size // tp
        adds = [step_time.Dispatch("allreduce_add", bytes_read=tp * part, bytes_written=part,
                                    dtype=act)]
        return adds, [step_time.Copy(0, part, peer=i, count=2) for i in peers], 2
    adds = [step_time.Dispatch("allreduce_add", bytes_read=tp * size, bytes_written=size,
                                dtype=act)]
    return adds, [step_time.Copy(0, size, peer=i) for i in peers], 2


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
    D = step_time.Dispatch
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
        copies += [step_time.Copy(0, t * vocab_rows * a, peer=i) for i in range(1, tp)]
        steps += 1
    return dispatches, copies, steps


def call_estimate(cfg, tp, spec, gpu, *, tokens, q_len, pairs, bytes_read, kv_read,
              algorithm, moe="ffn") -> CallEstimate:
    """Matmul weights run at the `--dtype` peak; lm_head and attention at the activation
    dtype's peak (fp8 models keep lm_head in f16). The token embedding is a lookup."""
    kinds = weights_by_kind(cfg, tp, spec, moe)
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
    est = step_time.estimate(ds, cs, gpu, dependent_steps=steps)
    return CallEstimate(tokens=tokens, bytes_read=bytes_read, flops=matmul + other,
                    memory_s=bytes_read / gpu.hbm_bytes_per_s, compute_s=compute_s,
                    comm_s=est.comm_s, estimate=est, dispatches=sum(d.count for d in ds),
                    dependent_steps=steps)


def weights_read(cfg: LlamaConfig, tp: int, spec: DtypeSpec, tokens: int,
                  moe: str = "ffn") -> int:
    """Weight bytes a forward pass of `tokens` tokens streams from HBM: all but the token
    embedding, which is only looked up (unless tied, when it is also the lm_head), and of
    the experts what `experts_read` says."""
    kinds = weights_by_kind(cfg, tp, spec, moe)
    skip = 0 if cfg.tie_embeddings else kinds["embed"][1]
    experts = kinds.get("expert", (0, 0))[1]
    held = cfg.n_experts / tp if cfg.is_moe else 1.0
    return (sum(b for _, b in kinds.values()) - skip - experts
            + int(experts * experts_read(cfg, tp, tokens, moe) / held))


def decode_estimate(cfg, tp, spec, gpu, *, batch, seq_len, kv_token_bytes,
                    algorithm="auto", moe="ffn") -> CallEstimate:
    """One decode step: `batch` tokens, each at position seq_len-1 attending to seq_len keys.
    Reads the weights once and every sequence's KV (seq_len tokens)."""
    kv = batch * seq_len * kv_token_bytes
    return call_estimate(cfg, tp, spec, gpu, tokens=batch, q_len=1, pairs=batch * seq_len,
                     bytes_read=weights_read(cfg, tp, spec, batch, moe) + kv, kv_read=kv,
                     algorithm=algorithm, moe=moe)


def prefill_estimate(cfg, tp, spec, gpu, *, batch, seq_len, kv_token_bytes,
                     algorithm="auto", moe="ffn") -> CallEstimate:
    """One prefill of `batch` rows of `seq_len` tokens with causal attention
    (seq_len*(seq_len+1)/2 pairs a row). Reads the weights, writes the KV."""
    kv = batch * seq_len * kv_token_bytes
    return call_estimate(cfg, tp, spec, gpu, tokens=batch * seq_len, q_len=seq_len,
                     pairs=batch * seq_len * (seq_len + 1) // 2,
                     bytes_read=weights_read(cfg, tp, spec, batch * seq_len, moe) + kv,
                     kv_read=0, algorithm=algorithm, moe=moe)
