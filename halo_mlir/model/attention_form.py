"""`--attention auto`: the paged kernels where their constraints hold, else the fused op.

One function decides, so `emit`, `generate`'s build, `export-shortfin` and the Python API
pick the same form for the same model and say why in the same words.
"""

from __future__ import annotations

import dataclasses

from halo_mlir.quantization import fp8
from halo_mlir.config import LlamaConfig
from halo_mlir.toolchain.compile import CPU_FP8_DECODE_MIN_GROUP
from halo_mlir.errors import HaloError

AUTO = "auto"


def paged_problem(cfg: LlamaConfig, opts) -> str | None:
    """Why the paged kernels cannot be instantiated for this model (None: they can)."""
    from halo_mlir import kernels

    common = dict(dtype=opts.activation_dtype, kv_heads=cfg.n_kv_heads,
                  group=cfg.n_heads // cfg.n_kv_heads, head_dim=cfg.head_dim,
                  stride=opts.block_seq_stride, layers=cfg.n_layers)
    uses = [("paged_prefill_attention", bs) for bs in sorted(set(opts.bs_prefill))] + \
           [("paged_decode_attention", bs) for bs in sorted(set(opts.bs_decode))]
    for name, bs in uses:
        try:
            kernels.kernel(name).validate({**common, "batch": bs})
        except HaloError as e:
            return str(e)
    return None


def choose(cfg: LlamaConfig, opts, *, target: str | None = None, iree=None) -> tuple[str, str]:
    """(form, why) for `--attention auto`. `target`: the compile target when known (a
    release may not compile the fused op for it); `iree`: a compat row (default: the
    installed release)."""
    from halo_mlir.toolchain import compat
    from halo_mlir.model.families import family

    allowed = family(cfg.family).attention
    if allowed is not None:  # e.g. Grok-1: soft-capped logits, decomposed only
        return allowed[0], (f"the {cfg.family} family's attention logits are soft-capped, "
                            f"which only the {'/'.join(allowed)} form computes")
    iree = iree or compat.current()
    if target is not None and target in iree.no_fused_attention:
        return "decomposed", (f"IREE {iree.release} cannot compile the fused attention op for "
                              f"{target}")
    if not iree.paged_attention:
        return "fused", f"IREE {iree.release} cannot compile the paged kernels"
    if opts.layer_loop:
        return "fused", "--layer-loop attends with the fused op inside the loop"
    if opts.cache_dtype == fp8.FP8:
        group = cfg.n_heads // cfg.n_kv_heads
        if group < CPU_FP8_DECODE_MIN_GROUP and 1 in opts.bs_decode:
            return "decomposed", (f"an fp8 KV cache with {group} query head(s) per kv head at "
                                  "decode batch 1: IREE's CPU codegen fails on the fp8 "
                                  "attention op there")
        return "fused", "an fp8 KV cache attends with the fused op"
    problem = paged_problem(cfg, opts)
    if problem:
        return "fused", f"the paged kernels do not fit this model ({problem})"
    return "paged", (f"the paged kernels' constraints hold: head_dim {cfg.head_dim} is a "
                     f"multiple of 16, dtype {opts.activation_dtype}")


def resolve(cfg: LlamaConfig, opts, *, target: str | None = None, iree=None):
    """(opts with a concrete form, the line to show the user or None when not auto)."""
    if opts.attention != AUTO:
        return opts, None
    form, why = choose(cfg, opts, target=target, iree=iree)
    return dataclasses.replace(opts, attention=form), f"--attention auto picked {form}: {why}"
