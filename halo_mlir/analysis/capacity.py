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
  `block_seq_stride` tokens; a page holds `LlamaConfig.page_elems` (layers * 2 *
  kv_heads/tp * stride * head_dim) elements per device (docs/ABI.md). The cache dtype defaults to the activation
  dtype, and to fp8 for fp8 models (docs/ABI.md's `CDT`).
- activations: the peak of live buffers inside one transformer block (buffers are reused
  block to block), plus the logits, for the larger of the two calls: a prefill of `batch`
  rows of `prefill_len` tokens, and a decode step of `batch` tokens at `max_seq_len`.
  See `activation_terms`.
- workspace: a flat `workspace_fraction` of the device memory (default 5%) for the HIP/IREE
  runtime, kernel scratch and allocator fragmentation.
- time: the step-time model of `halo-mlir cost` (step_time.py) over the kernels and copies
  a call needs, built from the config by `call_records`: per kernel max(bytes / HBM
  bandwidth, FLOPs / peak) + a launch cost, per copy its bytes over a link + a fixed cost,
  per dependent cross-device step a latency (2 all-reduces per block: after attn_output and
  after ffn_down). `memory_s`/`compute_s` keep the whole call's plain roofline terms.
"""

from __future__ import annotations

import dataclasses

from halo_mlir.analysis.inventory import (DTYPES, ELEM_BYTES, GB, activation_terms, dtype_spec,
                                          experts_read, kv_bytes_per_token, pages_for,
                                          param_count, weight_bytes)
from halo_mlir.analysis.kernel_records import (ALLREDUCE, CallEstimate,  # noqa: F401
                                               allreduce_seconds, decode_estimate,
                                               prefill_estimate)
from halo_mlir.config import LlamaConfig
from halo_mlir.errors import HaloError
from halo_mlir.toolchain.gpus import GPUS, GpuSpec, gpu_spec  # noqa: F401  (part of this API)
from halo_mlir.sharding_passes.plan import check_divisible


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
    decode: CallEstimate
    prefill: CallEstimate
    scheme: str | None = None      # a published FP8 checkpoint's scheme (summary line)
    fp8_keys: frozenset[str] | None = None
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
        def roof(r: CallEstimate) -> dict:
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
            **({"checkpoint_scheme": self.scheme} if self.scheme else {}),
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
         attention: str = "fused", allreduce: str = "auto", moe_parallel: str = "ffn",
         fp8_keys: frozenset[str] | None = None, scheme: str | None = None) -> Plan:
    """Plan `batch` sequences of up to `max_seq_len` tokens (default: the model's) on `tp`
    devices of kind `gpu`: the KV cache holds all of them and a decode step advances all of
    them. The prefill call counted for activations and timed takes `prefill_batch` rows
    (default `batch`) of `prefill_len` tokens (default `max_seq_len`, padded to a multiple
    of the stride as docs/ABI.md requires). `moe_parallel`: how --tp splits a mixture of
    experts (plan.MOE_PARALLEL). `fp8_keys`, `scheme`: a published FP8 checkpoint's fp8
    linears (the others in the float dtype; the step-time estimate still reads every
    linear as fp8) and its one-line description."""
    spec, dev = dtype_spec(dtype), gpu_spec(gpu)
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
    page_bytes = cfg.page_elems(block_seq_stride, tp) * ELEM_BYTES[kv_dtype]
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
        weight_bytes=weight_bytes(cfg, tp, dtype, moe_parallel, fp8_keys),
        page_bytes=page_bytes, scheme=scheme, fp8_keys=fp8_keys,
        kv_pages=pages_for(batch, max_seq_len, block_seq_stride),
        activation_terms=phases[phase], activation_phase=phase,
        workspace_bytes=int(workspace_fraction * dev.memory_bytes),
        decode=decode_estimate(cfg, tp, spec, dev, batch=batch, seq_len=max_seq_len,
                               kv_token_bytes=token_kv, algorithm=allreduce, moe=moe_parallel),
        prefill=prefill_estimate(cfg, tp, spec, dev, batch=prefill_batch,
                                 seq_len=prefill_len, kv_token_bytes=token_kv,
                                 algorithm=allreduce, moe=moe_parallel),
        moe_parallel=moe_parallel,
    )


def _replan(p: Plan, **changes) -> Plan:
    knobs = dict(tp=p.tp, dtype=p.dtype, kv_dtype=None, max_seq_len=p.max_seq_len,
                 batch=p.batch, gpu=p.gpu.name, block_seq_stride=p.block_seq_stride,
                 workspace_fraction=p.workspace_fraction, prefill_len=p.prefill_len,
                 prefill_batch=p.prefill_batch, attention=p.attention, allreduce=p.allreduce,
                 moe_parallel=p.moe_parallel, fp8_keys=p.fp8_keys, scheme=p.scheme)
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
        *([("checkpoint", p.scheme)] if p.scheme else []),
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
