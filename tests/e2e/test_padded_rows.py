"""Padded batch rows, as shortfin sends them: a batch of 4 with 2 real sequences, the unused
rows holding token 0, seq_len 1 and page 0, and the real rows' page lists padded with page 0.
The real rows' logits must equal each sequence run alone (bs 1), and no page but page 0 and
the real rows' own may change. Random weights written with numpy: no torch, so this also
runs in the IREE 3.9 environment shortfin uses (marker iree39)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import halo

STRIDE = 8
PAGES = 16
# Sequences: (prompt length, its pages: prefill's, then one more per page decode reaches).
SEQS = [(13, [5, 9, 2]), (4, [3, 7])]
DECODE_STEPS = 6  # positions 13..18 (into the third page) and 4..9 (into the second)
CONFIG = dict(vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
              num_attention_heads=6, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
              max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False,
              architectures=["LlamaForCausalLM"], model_type="llama")


def random_model(d):
    """config.json + model.irpa (docs/ABI.md keys) with random f32 weights."""
    import iree.runtime as rt

    c = CONFIG
    rng = np.random.default_rng(0)
    h, hd, ffn = c["hidden_size"], c["head_dim"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd

    def w(*shape, scale=0.15):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    params = {"token_embd.weight": w(c["vocab_size"], h), "output_norm.weight": 1 + w(h, scale=0.2),
              "output.weight": w(c["vocab_size"], h)}
    for i in range(c["num_hidden_layers"]):
        params.update({
            f"blk.{i}.attn_norm.weight": 1 + w(h, scale=0.2), f"blk.{i}.attn_q.weight": w(q, h),
            f"blk.{i}.attn_k.weight": w(kv, h), f"blk.{i}.attn_v.weight": w(kv, h),
            f"blk.{i}.attn_output.weight": w(h, q), f"blk.{i}.ffn_norm.weight": 1 + w(h, scale=0.2),
            f"blk.{i}.ffn_gate.weight": w(ffn, h), f"blk.{i}.ffn_up.weight": w(ffn, h),
            f"blk.{i}.ffn_down.weight": w(h, ffn)})
    rt.save_archive_file(params, str(d / "model.irpa"))
    (d / "config.json").write_text(json.dumps(c))


def page_table(pages, used, blocks):
    """The first `used` pages, padded with page 0 to `blocks` (shortfin's padding)."""
    return list(pages[:used]) + [0] * (blocks - used)


@pytest.mark.iree39
def test_padded_rows_leave_other_rows_alone(tmp_path):
    from halo_mlir.inference.runtime import Program

    random_model(tmp_path)
    halo("emit", "--hf-config", tmp_path / "config.json", "--dtype", "f32", "--bs-prefill", "1,4",
         "--bs-decode", "1,4", "--block-seq-stride", STRIDE, "-o", tmp_path / "m.mlir",
         "--output-config", tmp_path / "service.json")
    halo("compile", tmp_path / "m.mlir", "--target", "cpu", "-o", tmp_path / "m.vmfb")
    page_elems = json.loads((tmp_path / "service.json").read_text())[
        "paged_kv_cache"]["paged_kv_block_size_elements_per_device"][0]
    rng = np.random.default_rng(1)
    vocab = CONFIG["vocab_size"]
    prompts = [rng.integers(1, vocab, n).tolist() for n, _ in SEQS]
    steps = [rng.integers(1, vocab, DECODE_STEPS).tolist() for _ in SEQS]
    # Every page starts with finite garbage, so a stray write anywhere shows.
    init = rng.standard_normal((PAGES, page_elems)).astype(np.float32)

    def run(placement: dict, bs: int):
        """Prefill, then decode, the sequences `placement` (batch row -> sequence) in a
        batch of `bs`; returns ({sequence: [logits of prefill's last token, then of each
        step]}, the cache after)."""
        out = {s: [] for s in placement.values()}
        with Program(tmp_path / "m.vmfb", [tmp_path / "model.irpa"]) as p:
            cache = p.device_array(init.copy())
            lens = {r: SEQS[s][0] for r, s in placement.items()}
            blocks = -(-max(lens.values()) // STRIDE)
            tokens = np.zeros((bs, blocks * STRIDE), np.int64)  # unused rows: token 0,
            seq_lens = np.ones(bs, np.int64)                     # seq_len 1,
            ids = np.zeros((bs, blocks), np.int64)               # page 0
            for r, s in placement.items():
                tokens[r, :lens[r]] = prompts[s]
                seq_lens[r] = lens[r]
                ids[r] = page_table(SEQS[s][1], -(-lens[r] // STRIDE), blocks)
            logits = p.prefill(tokens, seq_lens, ids, [cache])
            for r, s in placement.items():
                out[s].append(logits[r, lens[r] - 1])
            for step in range(DECODE_STEPS):
                pos = {r: lens[r] + step for r in placement}
                blocks = max(pos[r] // STRIDE + 1 for r in placement)
                tok = np.zeros((bs, 1), np.int64)
                start = np.zeros(bs, np.int64)  # unused rows: position 0, seq_len 1, page 0
                ids = np.zeros((bs, blocks), np.int64)
                for r, s in placement.items():
                    tok[r, 0] = steps[s][step]
                    start[r] = pos[r]
                    ids[r] = page_table(SEQS[s][1], pos[r] // STRIDE + 1, blocks)
                logits = p.decode(tok, start + 1, start, ids, [cache])
                for r, s in placement.items():
                    out[s].append(logits[r, 0])
            host = np.array(cache.to_host())
            del cache
        return out, host

    batched, cache = run({0: 0, 2: 1}, 4)  # rows 1 and 3 unused
    worst = 0.0
    for s, (_, pages) in enumerate(SEQS):
        alone, alone_cache = run({0: s}, 1)
        assert all(np.isfinite(x).all() for x in batched[s])
        worst = max(worst, max(float(np.abs(a - b).max()) for a, b in zip(batched[s], alone[s])))
        for page in pages:  # the sequence's pages hold what it wrote alone
            np.testing.assert_allclose(cache[page], alone_cache[page], atol=1e-5)
    owned = {0, *(pg for _, pages in SEQS for pg in pages)}
    untouched = [pg for pg in range(PAGES) if pg not in owned]
    assert np.array_equal(cache[untouched], init[untouched])  # bit for bit
    print(f"padded rows: real rows' logits within {worst:.2g} of each sequence alone; "
          f"{len(untouched)} other pages unchanged")
    assert worst < 1e-4
