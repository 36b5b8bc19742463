"""Mixtral (mixture of experts) end to end: import the HF checkpoint, emit, compile for CPU,
prefill right-padded rows and decode over shuffled pages, and compare every logit with
transformers' MixtralForCausalLM on the same random weights."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FULL, halo
from hf_reference import MIXTRAL_AWKWARD, make_mixtral, router_choices

from test_llama_vs_hf import STRIDE, prefill_then_decode

DECODE_STEPS = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_mixtral")
    return d, make_mixtral(d)


def test_router_choices_are_not_trivial(checkpoint):
    """Different tokens pick different experts in every layer (else the test below would
    not exercise the routing)."""
    _, model = checkpoint
    tokens = list(np.random.default_rng(1).integers(0, MIXTRAL_AWKWARD["vocab_size"], 32))
    for layer, picks in enumerate(router_choices(model, tokens)):
        used = set(picks.ravel().tolist())
        pairs = {tuple(sorted(p)) for p in picks.reshape(-1, picks.shape[-1]).tolist()}
        assert len(used) >= 4, (layer, used)  # of 6 experts
        assert len(pairs) >= 5, (layer, pairs)  # distinct expert pairs over 32 tokens


def build(d, dtype, prefill, loop=False):
    """`loop`: the stack as one scf.for over stacked parameters (--layer-loop)."""
    tag = f"{dtype}_{prefill}" + ("_loop" if loop else "")
    irpa = d / (f"w_{dtype}_stacked.irpa" if loop else f"w_{dtype}.irpa")
    mlir, vmfb = d / f"m_{tag}.mlir", d / f"m_{tag}.vmfb"
    if vmfb.exists():  # built by an earlier test of this module
        return vmfb, irpa
    if not irpa.exists():
        halo("import-params", "--safetensors", d, "--dtype", dtype, "-o", irpa,
             *(["--layout", "stacked"] if loop else []))
    halo("emit", "--hf-config", d / "config.json", "--dtype", dtype, "--moe-prefill", prefill,
         *(["--layer-loop"] if loop else []),
         "--bs-prefill", 2, "--bs-decode", 2, "--block-seq-stride", STRIDE, "-o", mlir)
    halo("compile", mlir, "--target", "cpu", "-o", vmfb)
    return vmfb, irpa


# (dtype, --moe-prefill, --layer-loop, max |logit error| vs transformers in f32). Logits
# here reach ~5.
CASES = [("f32", "grouped", False, 1e-3), ("f16", "grouped", False, 5e-2)]
# The full form (HALO_FULL=1) also runs the gather prefill and the layer loop.
FULL_CASES = [("f32", "gather", False, 1e-3), ("f32", "grouped", True, 1e-3)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype,prefill,loop,tol", CASES + (FULL_CASES if FULL else []))
def test_prefill_then_decode_matches_transformers(checkpoint, dtype, prefill, loop, tol):
    d, model = checkpoint
    worst, _ = prefill_then_decode(*build(d, dtype, prefill, loop), model, dtype,
                                   steps=DECODE_STEPS)
    print(f"mixtral {dtype}/{prefill}{'/loop' if loop else ''}: max |logit error| = "
          f"{worst[0]:.3g} ({worst[1]})")
    assert worst[0] <= tol, worst


@pytest.mark.slow
def test_layer_loop_equals_unrolled_bit_for_bit(checkpoint):
    """`--layer-loop` (one scf.for over stacked parameters) computes what the unrolled
    program computes, bit for bit: every prefill and decode logit and the whole cache after
    the steps (f32, grouped prefill; the router, top-k and the expert matmuls read the layer's
    slice of the stacked weights)."""
    from test_layer_loop import _run

    d, model = checkpoint
    c = model.config
    page_elems = c.num_hidden_layers * 2 * c.num_key_value_heads * STRIDE * c.head_dim
    unrolled, _ = _run(*build(d, "f32", "grouped"), "f32", page_elems, c.vocab_size)
    looped, _ = _run(*build(d, "f32", "grouped", loop=True), "f32", page_elems, c.vocab_size)
    for a, b in zip(unrolled, looped):  # every step's logits, then the whole cache
        assert a.shape == b.shape
        assert np.array_equal(a, b), f"loop differs from unrolled by {np.abs(a - b).max()}"
