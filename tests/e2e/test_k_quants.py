"""Q4_K / Q6_K weights kept quantized through the whole model: a GGUF in each K-quant and
in a Q4_K_M-like mix (tests/kquant_gguf.py, 2 layers, FFN 320 so ffn_down falls back to a
32-block format), run natively (`--keep-quantized`) and dequantized (gguf's dequantization
at import), both at f32 activations on CPU: prefill logits over a prompt that spans two
pages and greedy decode logits agree within f32 rounding."""

from __future__ import annotations

import numpy as np
import pytest

import kquant_gguf as kq
from conftest import FULL

PROMPT = [int(t) for t in np.random.default_rng(5).integers(0, kq.CFG["vocab"], 37)]
NEW_TOKENS = 6


def run(path, keep_quantized: bool, layer_loop: bool = False, prompt=PROMPT):
    """(prefill logits [len(PROMPT), vocab], greedy tokens, their logits) of the model."""
    from halo_mlir.inference.generate import Generator, build_from_gguf
    from halo_mlir.params.gguf_file import GgufFile

    notes = []
    with GgufFile(path) as g:
        files = build_from_gguf(g, dtype="f32", keep_quantized=keep_quantized, device="cpu",
                                layer_loop=layer_loop, echo=notes.append)
    gen = Generator(files, pages=8)
    try:
        prefill = gen.prefill_logits(prompt, gen.pages.alloc(2))
        logits: list = []
        tokens = list(gen.generate(prompt, NEW_TOKENS, record=logits))
    finally:
        gen.close()
    return prefill, tokens, np.stack(logits), notes


# CI runs the mixed file (Q4_K and Q6_K together); HALO_FULL=1 each format alone and the loop.
@pytest.mark.slow
@pytest.mark.parametrize("mix,layer_loop", [("q4_k_m", False)] + (
    [("q4_k", False), ("q6_k", False), ("q6_k", True)] if FULL else []))
def test_k_quants_native_equal_dequantized(tmp_path, monkeypatch, mix, layer_loop):
    """(--layer-loop: the stack as one loop over stacked block fields.)"""
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
    ref_prefill, ref_tokens, ref_logits, _ = run(path, False, layer_loop)
    prefill, tokens, logits, notes = run(path, True, layer_loop)
    fallback = [k for k, t in types.items() if t == "Q5_0"]
    assert all(k in " ".join(notes) for k in fallback) and bool(fallback) == any(
        "note: --keep-quantized" in n for n in notes), notes
    scale = float(np.abs(ref_prefill).max())
    err_prefill = float(np.abs(prefill - ref_prefill).max())
    err_decode = float(np.abs(logits - ref_logits).max())
    print(f"{mix}{' --layer-loop' * layer_loop}: logits up to {scale:.3g}; max |native - dequantized| prefill "
          f"{err_prefill:.3g}, decode {err_decode:.3g}; greedy {tokens}")
    assert tokens == ref_tokens
    assert err_prefill <= 1e-4 * max(scale, 1.0) and err_decode <= 1e-4 * max(scale, 1.0)
    assert scale > 0.1  # the logits are not degenerate


def test_mixed_formats_under_layer_loop_equal_unrolled(tmp_path, monkeypatch):
    """llama.cpp's Q4_K_M by layer (tests/kquant_gguf.q4_k_m_layers: ffn_down Q6_K / Q4_K,
    attn_v Q4_K / Q6_K, attn_q Q8_0 / Q5_0 in layers 0 / 1): --layer-loop dequantizes the
    kinds that mix formats (a note names them) and keeps the others native; its prefill and
    greedy decode logits equal the unrolled form's (every layer in its own format) within
    f32 rounding, and the same greedy tokens."""
    monkeypatch.setenv("HALO_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    kq.write(path, kq.q4_k_m_layers, ffn=512)
    prompt = [int(t) for t in np.random.default_rng(7).integers(0, kq.CFG["vocab"], 37)]
    ref_prefill, ref_tokens, ref_logits, _ = run(path, True, False, prompt)
    prefill, tokens, logits, notes = run(path, True, True, prompt)
    assert any("note: --layer-loop: 3 weight kind(s) mix formats" in n and "ffn_down.weight "
               "(Q6_K in 1, Q4_K in 1)" in n for n in notes), notes
    scale = float(np.abs(ref_prefill).max())
    err_prefill = float(np.abs(prefill - ref_prefill).max())
    err_decode = float(np.abs(logits - ref_logits).max())
    print(f"q4_k_m by layer, --layer-loop vs unrolled: logits up to {scale:.3g}; max "
          f"|difference| prefill {err_prefill:.3g}, decode {err_decode:.3g}; greedy {tokens}")
    assert tokens == ref_tokens and len(set(tokens)) > 1
    assert err_prefill <= 1e-4 * max(scale, 1.0) and err_decode <= 1e-4 * max(scale, 1.0)
    assert scale > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("mix,layer_loop", [("tp_mix", False)] + (
    [("q6_k", True)] if FULL else []))
def test_keep_quantized_tp2_equals_tp1(tmp_path, mix, layer_loop):
    """Kept-quantized weights under --tp 2 (Q4_K, Q6_K, Q8_0 and Q4_1 in one file; or Q6_K
    stacked for --layer-loop; hidden 512 = 2 super-blocks, so attn_output/ffn_down split at
    a block boundary): block fields split like their matrices, and the logits of prefill and
    decode equal TP1's at f32."""
    from conftest import halo
    from halo_mlir.inference.runtime import Program

    path = tmp_path / "m.gguf"
    types = kq.write(path, {"tp_mix": kq.tp_mix, "q6_k": kq.Q6_K}[mix], hidden=512)
    if mix == "tp_mix":
        assert {"Q4_K", "Q6_K", "Q8_0", "Q4_1"} <= set(types.values())
    loop = ["--layer-loop"] if layer_loop else []
    layout = ["--layout", "stacked"] if layer_loop else []
    field = "blk.attn_output.weight.stacked:{}.shard.1" if layer_loop else \
        "blk.0.attn_output.weight:{}.shard.1"
    big_field = "qs" if mix == "tp_mix" else "ql"
    cfg = {**kq.CFG, "hidden": 512}
    stride, head_dim = 32, 512 // cfg["heads"]
    page_elems = cfg["layers"] * 2 * cfg["kv_heads"] * stride * head_dim
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, cfg["vocab"], (1, 64)).astype(np.int64)
    steps = rng.integers(0, cfg["vocab"], (4, 1, 1)).astype(np.int64)
    outs = {}
    for tp in (1, 2):
        irpa, mlir, vmfb = (tmp_path / f"tp{tp}.{ext}" for ext in ("irpa", "mlir", "vmfb"))
        halo("import-params", "--gguf", path, "--keep-quantized", "--dtype", "f32",
             "--tp", tp, *layout, "-o", irpa)
        halo("emit", "--gguf", path, "--keep-quantized", "--dtype", "f32", "--tp", tp,
             *loop, "--bs-prefill", 1, "--bs-decode", 1, "-o", mlir)
        halo("compile", mlir, "--tp", tp, "-o", vmfb)
        params = [tmp_path / f"tp{tp}.rank{i}.irpa" for i in range(tp)] if tp > 1 else [irpa]
        if tp > 1:  # the block fields are split (one super-block a row each), not replicated
            shard = entries(params[1])
            assert field.format(big_field) in shard
            sc = np.frombuffer(shard[field.format("sc")].file_view, np.int8)
            per_block = 8 if mix == "tp_mix" else 16
            assert sc.size == (2 if layer_loop else 1) * 512 * 1 * per_block
        got = []
        with Program(vmfb, params, n_devices=tp) as prog:
            caches = [prog.device_array(np.zeros((4, page_elems // tp), np.float32), i)
                      for i in range(tp)]
            ids = np.array([[0, 1, 2]], np.int64)
            got.append(prog.prefill(tokens, np.array([60], np.int64), ids[:, :2].copy(),
                                    caches)[:, :60])
            for s, token in enumerate(steps):
                got.append(prog.decode(token, np.array([61 + s], np.int64),
                                       np.array([60 + s], np.int64), ids, caches))
            del caches
        outs[tp] = [np.asarray(x, np.float32) for x in got]
    scale = max(float(np.abs(x).max()) for x in outs[1])
    err = max(float(np.abs(a - b).max()) for a, b in zip(outs[1], outs[2]))
    print(f"keep-quantized {mix}{' --layer-loop' * layer_loop} TP2 vs TP1: logits up to {scale:.3g}, max |difference| {err:.3g}")
    # tests/e2e/test_tp.py's TP bound: the split contraction sums its partials in another
    # order (logits ~6 here, where 1e-5 is ~20 f32 ulps); a misplaced block would be >1e-2.
    assert scale > 0.1 and err <= 2e-5


def entries(path):
    import iree.runtime as rt

    index = rt.ParameterIndex()
    index.load(str(path))
    return {k: e for k, e in index.items()}
