"""The MoE block alone (ops/moe.py), both forms, compiled for CPU: against transformers'
MixtralSparseMoeBlock with the same weights, and the top-k tie rule against numpy."""

from __future__ import annotations

import numpy as np
import pytest

D, F, E, K = 32, 24, 6, 2


def _compile(form: str, renormalize: bool = True):
    """f(x[2,?,D], router[E,D], gate[E,F,D], up[E,F,D], down[E,D,F]) -> [2,?,D], f32."""
    import iree.compiler as ic
    import iree.runtime as rt
    from iree.compiler import ir

    from halo_mlir.ir_builder import Builder
    from halo_mlir.ops import moe

    run = {"gather": moe.moe_ffn, "grouped": moe.moe_ffn_grouped}[form]
    b = Builder()
    with b.context, b.at("moe"):
        module = b.new_module()
        types = [b.tensor_type(s, "f32") for s in ([2, None, D], [E, D], [E, F, D], [E, F, D],
                                                   [E, D, F])]
        b.define("f", types, lambda *a: run(b, *a, k=K, renormalize=renormalize, dtype="f32"))
        assert module.operation.verify()
        text = str(module)
    vmfb = ic.compile_str(text, target_backends=["llvm-cpu"],
                          extra_args=["--iree-llvmcpu-target-cpu=host"])
    return rt.load_vm_flatbuffer(vmfb, driver="local-task").f


def _hf_block(weights):
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                        num_experts_per_tok=K)
    block = MixtralSparseMoeBlock(cfg).eval()
    router, gate, up, down = (torch.from_numpy(w) for w in weights)
    with torch.no_grad():
        block.gate.weight.copy_(router)
        block.experts.gate_up_proj.copy_(torch.cat([gate, up], dim=1))
        block.experts.down_proj.copy_(down)
    return block


def _weights(rng):
    return [(rng.standard_normal(s) * scale).astype(np.float32)
            for s, scale in (((E, D), 0.5), ((E, F, D), 0.2), ((E, F, D), 0.2), ((E, D, F), 0.2))]


@pytest.mark.parametrize("form", ["gather", "grouped"])
def test_moe_block_matches_transformers(form):
    import torch

    f = _compile(form)
    rng = np.random.default_rng(0)
    weights = _weights(rng)
    block = _hf_block(weights)
    for s in (1, 7, 33):
        x = rng.standard_normal((2, s, D)).astype(np.float32)
        got = np.asarray(f(x, *weights).to_host())
        with torch.no_grad():
            want = block(torch.from_numpy(x)).numpy()
        err = np.abs(got - want).max()
        print(f"{form} S={s}: max |error| {err:.3g} (max |y| {np.abs(want).max():.3g})")
        assert err <= 1e-5 * max(1.0, np.abs(want).max()), (s, err)
        # More than one expert pair is in use, so the routing is exercised.
        with torch.no_grad():
            picks = torch.topk(torch.softmax(block.gate(torch.from_numpy(x))[0], -1), K).indices
        assert s == 1 or len({tuple(sorted(p)) for p in picks.tolist()}) > 1


def test_top_k_ties_pick_the_lower_expert():
    """Equal router probabilities (duplicated router rows): the lower expert index wins,
    whatever order the reduction runs in. Without renormalization (Grok-1's routing) the
    weights are the softmax probabilities themselves."""
    f = _compile("gather", renormalize=False)
    rng = np.random.default_rng(1)
    router, gate, up, down = _weights(rng)
    router[3] = router[1]  # experts 1 and 3 always tie
    router[5] = router[1]  # and 5
    x = rng.standard_normal((2, 9, D)).astype(np.float32)
    got = np.asarray(f(x, router, gate, up, down).to_host())
    logits = x @ router.T
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    idx = np.argsort(-p, -1, kind="stable")[..., :K]  # stable: the lower index first
    w = np.take_along_axis(p, idx, -1)
    g = np.einsum("bsd,bskfd->bskf", x, gate[idx])
    u = np.einsum("bsd,bskfd->bskf", x, up[idx])
    y = np.einsum("bskf,bskdf->bskd", g / (1 + np.exp(-g)) * u, down[idx])
    want = (y * w[..., None]).sum(2)
    # The tied experts reach the top k, so the rule decides (expert 5 never picked).
    rows = idx.reshape(-1, K).tolist()
    assert any(1 in row for row in rows) and not any(5 in row for row in rows)
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()
