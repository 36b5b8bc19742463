"""Mixtral under tensor parallelism on 2 local CPU devices: each expert's ffn rows split
like the dense FFN, the router replicated; the TP2 logits equal the TP1 program's (f32)
over a grouped prefill and decode steps, and transformers' (1e-3)."""

from __future__ import annotations

import numpy as np

from hf_reference import logits, make_mixtral
from test_llama_vs_hf import LENS, STRIDE
from test_tp import TP_BOUND, _max_diff, build, run


def test_tp2_matches_tp1_and_transformers(tmp_path):
    model = make_mixtral(tmp_path, seed=2)
    c = model.config
    page_elems = c.num_hidden_layers * 2 * c.num_key_value_heads * STRIDE * c.head_dim
    one, _ = run(*build(tmp_path, 1), 1, page_elems, c.vocab_size)
    two, tokens = run(*build(tmp_path, 2), 2, page_elems, c.vocab_size)
    diff = _max_diff(one, two)
    print(f"mixtral TP2 vs TP1: max |logit diff| = {diff:.3g}")
    assert diff <= TP_BOUND, diff
    # And the sharded program is right, not only self-consistent: prefill row 0 vs HF.
    ref = logits(model, list(tokens[0, :LENS[0]]))
    err = float(np.abs(two[0][0, :LENS[0]] - ref).max())
    print(f"mixtral TP2 vs transformers (prefill row 0): {err:.3g}")
    assert err <= 1e-3, err
