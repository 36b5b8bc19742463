"""Emit -> compile for CPU -> run prefill + decode over a shuffled paged cache, and compare
every logit with HF transformers' LlamaForCausalLM on the same random weights."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import halo
from hf_reference import AWKWARD, logits, make_model

STRIDE = 8
PAGES = 12
LENS = [11, 5]  # right-padded prefill rows of different lengths
PREFILL_LEN = 16  # a multiple of STRIDE
DECODE_STEPS = 5
# Non-contiguous, shuffled page ids; the decode steps cross into each row's next page.
BLOCK_IDS = np.array([[7, 2, 9, 5], [4, 11, 0, 3]], dtype=np.int64)

NP_DTYPES = {"f32": np.float32, "f16": np.float16}

# (dtype, attention, max |logit error| vs transformers in f32). Logits here reach ~6.
CASES = [
    ("f32", "fused", 1e-3),
    ("f32", "decomposed", 1e-3),
    ("f16", "fused", 5e-2),
    ("f16", "decomposed", 5e-2),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_llama")
    return d, make_model(d)


def _page_elems():
    return (AWKWARD["num_hidden_layers"] * 2 * AWKWARD["num_key_value_heads"] * STRIDE
            * AWKWARD["head_dim"])


def build(d, dtype, attention):
    irpa, mlir, vmfb = d / f"w_{dtype}.irpa", d / f"m_{dtype}_{attention}.mlir", \
        d / f"m_{dtype}_{attention}.vmfb"
    if not irpa.exists():
        halo("import-params", "--safetensors", d, "--dtype", dtype, "-o", irpa)
    halo("emit", "--hf-config", d / "config.json", "--dtype", dtype, "--attention", attention,
         "--bs-prefill", 2, "--bs-decode", 2, "--block-seq-stride", STRIDE, "-o", mlir)
    halo("compile", mlir, "--target", "cpu", "-o", vmfb)
    return vmfb, irpa


@pytest.mark.parametrize("dtype,attention,tol", CASES)
def test_prefill_then_decode_matches_transformers(checkpoint, dtype, attention, tol):
    from halo_mlir.runtime import Program

    d, model = checkpoint
    vmfb, irpa = build(d, dtype, attention)
    rng = np.random.default_rng(1)
    vocab = AWKWARD["vocab_size"]
    tokens = rng.integers(0, vocab, size=(2, PREFILL_LEN)).astype(np.int64)
    errors = []
    with Program(vmfb, [irpa]) as prog:
        cache = prog.device_array(np.zeros((PAGES, _page_elems()), NP_DTYPES[dtype]))
        out = prog.prefill(tokens, np.array(LENS, np.int64),
                           BLOCK_IDS[:, :PREFILL_LEN // STRIDE].copy(), [cache])
        assert out.shape == (2, PREFILL_LEN, vocab) and out.dtype == NP_DTYPES[dtype]
        seqs = [list(tokens[b, :n]) for b, n in enumerate(LENS)]
        for b, seq in enumerate(seqs):
            errors.append(("prefill", b, np.abs(out[b, :LENS[b]] - logits(model, seq)).max()))
        for step in range(DECODE_STEPS):
            new = rng.integers(0, vocab, size=(2, 1)).astype(np.int64)
            start = np.array([len(s) for s in seqs], np.int64)
            out = prog.decode(new, start + 1, start, BLOCK_IDS, [cache])
            assert out.shape == (2, 1, vocab)
            for b in range(2):
                seqs[b].append(int(new[b, 0]))
                ref = logits(model, seqs[b])[-1]
                errors.append((f"decode {step}", b, np.abs(out[b, 0] - ref).max()))
        host_cache = cache.to_host()
    worst = max(errors, key=lambda e: e[2])
    print(f"{dtype}/{attention}: max |logit error| = {worst[2]:.3g} ({worst[0]}, row {worst[1]})")
    assert worst[2] <= tol, errors
    # The cache was updated in place: the pages the rows own hold K/V, no other page does.
    used = set(BLOCK_IDS[0, :2]) | set(BLOCK_IDS[1, :2])
    for page in range(PAGES):
        assert bool(np.any(host_cache[page] != 0)) == (page in used), page
