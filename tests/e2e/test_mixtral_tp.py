"""Mixtral under tensor parallelism on local CPU devices, in both `--moe-parallel` modes:
`ffn` (each expert's ffn rows split like the dense FFN) and `expert` (whole experts per
device, the partial sums of each device's experts meeting in the block's all-reduce). The
router is replicated in both. The sharded logits equal the TP1 program's (f32, TP_BOUND)
over a prefill and decode steps, and transformers' (1e-3)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FULL
from hf_reference import logits, make_mixtral
from test_llama_vs_hf import LENS, STRIDE
from test_tp import TP_BOUND, _max_diff, build, run


def _page_elems(c) -> int:
    return c.num_hidden_layers * 2 * c.num_key_value_heads * STRIDE * c.head_dim


def _check(d, model, one, tp, mode):
    c = model.config
    many, tokens = run(*build(d, tp, moe_parallel=mode), tp, _page_elems(c), c.vocab_size)
    diff = _max_diff(one, many)
    # And the sharded program is right, not only self-consistent: prefill row 0 vs HF.
    ref = logits(model, list(tokens[0, :LENS[0]]))
    err = float(np.abs(many[0][0, :LENS[0]] - ref).max())
    print(f"mixtral TP{tp} --moe-parallel {mode}: max |logit diff| vs TP1 = {diff:.3g}, "
          f"vs transformers (prefill row 0) = {err:.3g}")
    assert diff <= TP_BOUND, diff
    assert err <= 1e-3, err


@pytest.fixture(scope="module")
def six_experts(tmp_path_factory):
    """The Mixtral test model (6 experts, 2 kv heads) and its TP1 logits."""
    d = tmp_path_factory.mktemp("mixtral_tp")
    model = make_mixtral(d, seed=2)
    c = model.config
    one, _ = run(*build(d, 1), 1, _page_elems(c), c.vocab_size)
    return d, model, one


@pytest.mark.parametrize("mode", ["ffn", "expert"])
def test_tp2_matches_tp1_and_transformers(six_experts, mode):
    _check(*six_experts, 2, mode)


@pytest.fixture(scope="module")
def eight_experts(tmp_path_factory):
    """8 experts and 4 kv heads (8 query heads), so TP4 divides both."""
    d = tmp_path_factory.mktemp("mixtral_tp4")
    model = make_mixtral(d, seed=4, num_local_experts=8, num_key_value_heads=4,
                         num_attention_heads=8)
    c = model.config
    one, _ = run(*build(d, 1), 1, _page_elems(c), c.vocab_size)
    return d, model, one


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="TP4 in both modes: three more compiles (HALO_FULL=1)")
@pytest.mark.parametrize("mode", ["ffn", "expert"])
def test_tp4_matches_tp1_and_transformers(eight_experts, mode):
    _check(*eight_experts, 4, mode)
