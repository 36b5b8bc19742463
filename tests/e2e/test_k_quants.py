"""Q4_K / Q6_K weights kept quantized through the whole model: a GGUF in each K-quant and
in a Q4_K_M-like mix (tests/kquant_gguf.py, 2 layers, FFN 320 so ffn_down falls back to a
32-block format), run natively (`--keep-quantized`) and dequantized (gguf's dequantization
at import), both at f32 activations on CPU: prefill logits over a prompt that spans two
pages and greedy decode logits agree within f32 rounding."""

from __future__ import annotations

import numpy as np
import pytest

import kquant_gguf as kq

PROMPT = [int(t) for t in np.random.default_rng(5).integers(0, kq.CFG["vocab"], 37)]
NEW_TOKENS = 6


def run(path, keep_quantized: bool):
    """(prefill logits [len(PROMPT), vocab], greedy tokens, their logits) of the model."""
    from halo_mlir.generate import Generator, build_from_gguf
    from halo_mlir.params.gguf_file import GgufFile

    notes = []
    with GgufFile(path) as g:
        files = build_from_gguf(g, dtype="f32", keep_quantized=keep_quantized, device="cpu",
                                echo=notes.append)
    gen = Generator(files, pages=8)
    try:
        prefill = gen.prefill_logits(PROMPT, gen.pages.alloc(2))
        logits: list = []
        tokens = list(gen.generate(PROMPT, NEW_TOKENS, record=logits))
    finally:
        gen.close()
    return prefill, tokens, np.stack(logits), notes


@pytest.mark.parametrize("mix", ["q4_k", "q6_k", "q4_k_m"])
def test_k_quants_native_equal_dequantized(tmp_path, monkeypatch, mix):
    monkeypatch.setenv("HALO_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / f"{mix}.gguf"
    types = kq.write(path, {"q4_k": kq.Q4_K, "q6_k": kq.Q6_K, "q4_k_m": kq.q4_k_m}[mix])
    assert {"Q4_K": mix != "q6_k", "Q6_K": mix != "q4_k"} == \
        {t: t in types.values() for t in ("Q4_K", "Q6_K")}
    from halo_mlir.params.gguf_file import GgufFile
    from halo_mlir.params.gguf_import import weight_formats

    with GgufFile(path) as g:  # what runs natively: every K-quant matrix
        native = weight_formats(g, g.config(), True)
    assert {k for k, t in types.items() if t in ("Q4_K", "Q6_K")} <= set(native)
    ref_prefill, ref_tokens, ref_logits, _ = run(path, False)
    prefill, tokens, logits, notes = run(path, True)
    fallback = [k for k, t in types.items() if t == "Q5_0"]
    assert all(k in " ".join(notes) for k in fallback) and bool(fallback) == any(
        "note: --keep-quantized" in n for n in notes), notes
    scale = float(np.abs(ref_prefill).max())
    err_prefill = float(np.abs(prefill - ref_prefill).max())
    err_decode = float(np.abs(logits - ref_logits).max())
    print(f"{mix}: logits up to {scale:.3g}; max |native - dequantized| prefill "
          f"{err_prefill:.3g}, decode {err_decode:.3g}; greedy {tokens}")
    assert tokens == ref_tokens
    assert err_prefill <= 1e-4 * max(scale, 1.0) and err_decode <= 1e-4 * max(scale, 1.0)
    assert scale > 0.1  # the logits are not degenerate
