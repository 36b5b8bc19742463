"""A Mixtral GGUF and a Grok GGUF served by shortfin: `halo-mlir export-shortfin` in the
IREE 3.9 + shortfin environment (which emits the experts' prefill in the gather form: 3.9
computes the grouped form wrongly), the printed server started on a free port, three
prompts sent alone and batched, and the generated ids compared with transformers' greedy
ids (Mixtral) or test_grok_vs_reference's torch reference's (Grok).

Runs with HALO_FULL=1 (an IREE 3.9 compile and a server start each, ~75 s); the choice of
the gather form under 3.9 is pinned by tests/unit/test_moe.py in every run."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest

from conftest import FULL, halo_in, shortfin_python
from hf_reference import MIXTRAL_AWKWARD, make_mixtral
from moe_gguf import byte_level_bpe, write_mixtral_gguf
from test_moe_generate import EOS, _reference_greedy
from test_shortfin import free_port, post, serve

PROMPTS = ["In the beginning", "A model of", "The quick brown fox"]
NEW_TOKENS = 8


def _mixtral(tmp_path):
    """(GGUF, transformers' greedy ids per prompt, tokenizer)."""
    from safetensors.numpy import load_file

    model = make_mixtral(tmp_path)
    tk = byte_level_bpe(MIXTRAL_AWKWARD["vocab_size"], EOS)
    hf = json.loads((tmp_path / "config.json").read_text())
    write_mixtral_gguf(tmp_path / "m.gguf", load_file(str(tmp_path / "model.safetensors")), hf,
                       tokenizer=tk)
    want = []
    for p in PROMPTS:
        ids, steps = _reference_greedy(model, tk.encode(p).ids, NEW_TOKENS)
        assert min(float(np.diff(np.sort(s)[-2:])[0]) for s in steps) > 1e-2, p  # clear picks
        want.append(ids)
    return tmp_path / "m.gguf", want, tk


def _grok(tmp_path):
    """(GGUF, the torch reference's greedy ids per prompt, tokenizer)."""
    from test_grok_vs_reference import V, make_weights, reference, write_gguf

    w, tk = make_weights(), byte_level_bpe(V, EOS)
    write_gguf(tmp_path / "grok.gguf", w, tokenizer=tk)
    want = []
    for p in PROMPTS:
        ids = tk.encode(p).ids
        for _ in range(NEW_TOKENS):
            ids.append(int(reference(w, ids)[-1].argmax()))
        want.append(ids[-NEW_TOKENS:])
    return tmp_path / "grok.gguf", want, tk


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="an IREE 3.9 compile and a shortfin server: HALO_FULL=1")
@pytest.mark.parametrize("make", [_mixtral, _grok], ids=["mixtral", "grok"])
def test_shortfin_serves_greedy_tokens(tmp_path, make):
    python = shortfin_python()
    gguf_path, want, tk = make(tmp_path)
    assert not any(tk.token_to_id(EOS) in w for w in want)  # shortfin would stop there
    out = tmp_path / "served"
    proc = halo_in(python, "export-shortfin", "--gguf", gguf_path, "--out", out,
                   "--bs", "1,4")
    assert "mixture-of-experts prefill in the gather form" in proc.stderr
    args = shlex.split(proc.stdout.strip().splitlines()[-1])
    port = free_port()
    args[args.index("--port") + 1] = str(port)
    with serve(python, args[3:], port, tmp_path / "server.log"):
        params = {"max_completion_tokens": NEW_TOKENS}
        for p, w in zip(PROMPTS, want):
            assert post(port, {"text": p, "sampling_params": params,
                               "return_input_ids": True}) == [w], p
        got = post(port, {"text": PROMPTS, "sampling_params": params, "return_input_ids": True})
        assert got == [[w] for w in want]
