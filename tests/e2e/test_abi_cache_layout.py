"""docs/ABI.md's paged KV-cache layout, read back from a run: prefill two right-padded rows
into shuffled pages and decode one token, then find every position's K (after RoPE) and V
where the doc's page table says they are, and compare with the keys and values HF
transformers' LlamaForCausalLM caches for the same tokens. At TP2 (two CPU devices) each
device's cache argument holds its kv heads, as the table's split column says."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import halo
from hf_reference import AWKWARD, make_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_abi_doc import doc_tables, evaluate, symbols, table  # noqa: E402

STRIDE = 8
PAGES = 10
LENS = [11, 5]
PREFILL_LEN = 16
BLOCK_IDS = np.array([[7, 2, 9], [4, 8, 0]], dtype=np.int64)  # shuffled, 3 pages a row


def hf_kv(model, tokens: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, (K, V) [kv_heads, len, head_dim] that transformers caches (K after RoPE)."""
    import torch

    with torch.no_grad():
        cache = model(torch.tensor([tokens]), use_cache=True).past_key_values
    return [(layer.keys[0].float().numpy(), layer.values[0].float().numpy())
            for layer in cache.layers]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("abi_cache")
    return d, make_model(d)


def run(d, tp: int):
    """The caches' host copies (one per device) after prefill + one decode step."""
    from halo_mlir.config import from_hf_config
    from halo_mlir.inference.runtime import Program

    halo("import-params", "--safetensors", d, "--dtype", "f32", "--tp", tp, "-o", d / "w.irpa")
    halo("emit", "--hf-config", d / "config.json", "--dtype", "f32", "--attention", "fused",
         "--bs-prefill", 2, "--bs-decode", 2, "--block-seq-stride", STRIDE, "--tp", tp,
         "-o", d / f"m{tp}.mlir")
    halo("compile", d / f"m{tp}.mlir", "--target", "cpu", "--tp", tp, "-o", d / f"m{tp}.vmfb")
    params = [d / "w.irpa"] if tp == 1 else [d / f"w.rank{i}.irpa" for i in range(tp)]
    cfg = from_hf_config(d / "config.json")
    tables = doc_tables()
    ns = symbols(tables, cfg, stride=STRIDE, tp=tp)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, AWKWARD["vocab_size"], size=(2, PREFILL_LEN)).astype(np.int64)
    new = rng.integers(0, AWKWARD["vocab_size"], size=(2, 1)).astype(np.int64)
    with Program(d / f"m{tp}.vmfb", params, n_devices=tp) as prog:
        caches = [prog.device_array(np.zeros((PAGES, ns["page_elems"] // tp), np.float32), i)
                  for i in range(tp)]
        prog.prefill(tokens, np.array(LENS, np.int64), BLOCK_IDS[:, :PREFILL_LEN // STRIDE].copy(),
                     caches)
        start = np.array(LENS, np.int64)
        prog.decode(new, start + 1, start, BLOCK_IDS, caches)
        hosts = [c.to_host() for c in caches]
    seqs = [[*tokens[b, :n], int(new[b, 0])] for b, n in enumerate(LENS)]
    return tables, ns, hosts, seqs


@pytest.mark.parametrize("tp", [1, 2])
def test_cache_pages_hold_each_positions_k_and_v_where_the_doc_says(checkpoint, tp):
    d, model = checkpoint
    tables, ns, hosts, seqs = run(d, tp)
    rows = table(tables, "Paged KV cache layout")
    sizes = [evaluate(r["size"], ns) for r in rows]
    (split,) = [i for i, r in enumerate(rows) if r["split at tp > 1"] == "yes"]
    local = [s // tp if i == split else s for i, s in enumerate(sizes)]
    # The doc's 5-D view of each device's pages, device d's slice of the split dim in order.
    pages = np.concatenate([h.reshape(PAGES, *local) for h in hosts], axis=1 + split)
    dim = {name: next(i for i, r in enumerate(rows) if r["holds"].startswith(name))
           for name in ("layer", "K", "kv head", "position", "head dim")}
    k_index = 0  # the doc: "K (index 0) or V (index 1)"
    assert "K (index 0)" in rows[dim["K"]]["holds"]
    compared, worst = 0, (0.0, "")
    for b, seq in enumerate(seqs):
        ref = hf_kv(model, seq)
        for layer, (k_ref, v_ref) in enumerate(ref):
            for p in range(len(seq)):  # the prompt's positions and the decoded one
                page = pages[BLOCK_IDS[b, p // STRIDE]]
                for which, want in ((k_index, k_ref), (1 - k_index, v_ref)):
                    index = [slice(None)] * 5
                    index[dim["layer"]], index[dim["K"]] = layer, which
                    index[dim["position"]] = p % STRIDE
                    got = page[tuple(index)]  # [kv head, head dim] in the doc's order
                    if dim["kv head"] > dim["head dim"]:
                        got = got.T
                    err = float(np.abs(got - want[:, p]).max())
                    worst = max(worst, (err, f"row {b} layer {layer} position {p} kv {which}"))
                    compared += 1
    assert compared == 2 * ns["layers"] * sum(len(s) for s in seqs)
    print(f"max |cache - transformers' K/V| = {worst[0]:.3g} ({worst[1]})")
    assert worst[0] <= 1e-4, worst  # an f32 program against the f32 reference
    # Pages no row owns stay untouched.
    for page in sorted(set(range(PAGES)) - set(BLOCK_IDS.ravel())):
        assert not any(np.any(h[page]) for h in hosts), page
