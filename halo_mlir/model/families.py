"""Model families as data: what a decoder block runs beyond the shared attention.

The decoder (`model/decoder.py`) reads the same for every family: attn_norm -> attention ->
residual -> ffn_norm -> the family's FFN -> residual. A family is an entry of `FAMILIES`:
its FFN builder and what it does not support yet. Its parameter names and shapes are the
family's table in `params/names.py` (`FAMILY_HF_NAMES`, `block_shapes`); its
hyperparameters are fields of `LlamaConfig` (`family`, `n_experts`, ...).

To add a family: a config preset / HF model_type (config.py), a names table
(params/names.py), an FFN builder here (ops/ for new op kinds), one `FAMILIES` entry.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from halo_mlir.errors import HaloError, lookup
from halo_mlir.ops.ffn import silu_mul
from halo_mlir.ops.moe import moe_ffn, moe_ffn_expert_groups, moe_ffn_grouped


def dense_ffn(m, i, x, weights, linear):
    """SwiGLU: down(silu(gate(x)) * up(x)). `linear(name, x)` applies the block's weight
    `name` (plain, kept quantized or fp8)."""
    gate = linear("ffn_gate", x)
    up = linear("ffn_up", x)
    return linear("ffn_down", silu_mul(m.b, gate, up, dtype=m.dt))


def mixture_ffn(m, i, x, weights, linear):
    """Router + top-k SwiGLU experts (ops/moe.py). Decode (a few tokens) reads each token's
    experts' weight rows; prefill (a dynamic number of tokens) groups the tokens by expert
    unless `--moe-prefill gather`. Expert parallelism (`--moe-parallel expert`) runs the
    experts in one group per device instead, prefill and decode alike."""
    cfg = m.cfg
    prefill = m.b.shape(x)[1] is None
    if m.opts.moe_parallel == "expert":
        return moe_ffn_expert_groups(
            m.b, x, weights["ffn_gate_inp"], weights["ffn_gate_exps"], weights["ffn_up_exps"],
            weights["ffn_down_exps"], k=cfg.experts_per_token, renormalize=cfg.moe_renormalize,
            dtype=m.dt, groups=m.opts.moe_groups, act=cfg.ffn_activation)
    run = moe_ffn_grouped if prefill and m.opts.moe_prefill == "grouped" else moe_ffn
    return run(m.b, x, weights["ffn_gate_inp"], weights["ffn_gate_exps"],
                   weights["ffn_up_exps"], weights["ffn_down_exps"],
                   k=cfg.experts_per_token, renormalize=cfg.moe_renormalize, dtype=m.dt,
                   act=cfg.ffn_activation)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    # (model, layer, x[N,S,D] after ffn_norm, the block's weights by name, linear) -> [N,S,D]
    ffn: Callable
    # Emit options this family cannot take yet: option -> why (checked by `check`).
    unsupported: tuple[tuple[str, str], ...] = ()
    # The attention forms it can run (None: all). Grok-1 caps the attention logits
    # (cap * tanh(x / cap)), which the fused op and the paged kernels cannot express.
    attention: tuple[str, ...] | None = None

    def check(self, opts) -> None:
        active = {"dtype fp8": opts.dtype == "fp8", "keep-quantized": bool(opts.weight_formats),
                  "layer-loop": opts.layer_loop}
        for option, why in self.unsupported:
            if active[option]:
                raise HaloError(f"--{option} is not supported for the {self.name} family yet "
                                f"({why}); emit without it")

    def attention_form(self, requested: str) -> str:
        """The attention form to emit: `requested`, a concrete form (`auto` is resolved
        before, by model/attention_form.py, which reads `attention`); for a family that
        takes only some forms, any other is an error."""
        if self.attention is None or requested in self.attention:
            return requested
        raise HaloError(f"--attention {requested} cannot run the {self.name} family (its "
                        f"attention logits are soft-capped, which only the "
                        f"{'/'.join(self.attention)} form computes); use --attention "
                        f"{self.attention[0]}")


FAMILIES = {
    "llama": Family("llama", dense_ffn),
    "mixtral": Family("mixtral", mixture_ffn),
    # Grok-1: Mixtral's MoE block with GELU experts and no renormalization (config fields),
    # four norms a block (params.names.POST_NORMS), soft-capped attention.
    "grok": Family("grok", mixture_ffn, attention=("decomposed",)),
}


def family(name: str) -> Family:
    return lookup(FAMILIES, name, "model family")
