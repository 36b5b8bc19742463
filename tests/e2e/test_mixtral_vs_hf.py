"""Mixtral (mixture of experts) end to end: import the HF checkpoint, emit, compile for CPU,
prefill right-padded rows and decode over shuffled pages, and compare every logit with
transformers' MixtralForCausalLM on the same random weights."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FULL, halo
from hf_reference import MIXTRAL_AWKWARD, logits, make_mixtral, router_choices

STRIDE = 8
PAGES = 12
LENS = [11, 5]  # right-padded prefill rows of different lengths
PREFILL_LEN = 16
DECODE_STEPS = 4
BLOCK_IDS = np.array([[7, 2, 9, 5], [4, 11, 0, 3]], dtype=np.int64)
NP_DTYPES = {"f32": np.float32, "f16": np.float16}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_mixtral")
    return d, make_mixtral(d)


def _page_elems(model):
    c = model.config
    return c.num_hidden_layers * 2 * c.num_key_value_heads * STRIDE * c.head_dim


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
    from halo_mlir.runtime import Program

    d, model = checkpoint
    vmfb, irpa = build(d, dtype, prefill, loop)
    rng = np.random.default_rng(1)
    vocab = MIXTRAL_AWKWARD["vocab_size"]
    tokens = rng.integers(0, vocab, size=(2, PREFILL_LEN)).astype(np.int64)
    errors = []
    with Program(vmfb, [irpa]) as prog:
        cache = prog.device_array(np.zeros((PAGES, _page_elems(model)), NP_DTYPES[dtype]))
        out = prog.prefill(tokens, np.array(LENS, np.int64),
                           BLOCK_IDS[:, :PREFILL_LEN // STRIDE].copy(), [cache])
        assert out.shape == (2, PREFILL_LEN, vocab) and out.dtype == NP_DTYPES[dtype]
        seqs = [list(tokens[b, :n]) for b, n in enumerate(LENS)]
        for b, seq in enumerate(seqs):
            errors.append((np.abs(out[b, :LENS[b]] - logits(model, seq)).max(), f"prefill row {b}"))
        for step in range(DECODE_STEPS):
            new = rng.integers(0, vocab, size=(2, 1)).astype(np.int64)
            start = np.array([len(s) for s in seqs], np.int64)
            out = prog.decode(new, start + 1, start, BLOCK_IDS, [cache])
            for b in range(2):
                seqs[b].append(int(new[b, 0]))
                errors.append((np.abs(out[b, 0] - logits(model, seqs[b])[-1]).max(),
                               f"decode {step} row {b}"))
    worst = max(errors)
    print(f"mixtral {dtype}/{prefill}{'/loop' if loop else ''}: max |logit error| = {worst[0]:.3g} ({worst[1]})")
    assert worst[0] <= tol, worst
