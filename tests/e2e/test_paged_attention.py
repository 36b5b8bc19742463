"""`--attention paged` (templated kernels reading the cache pages; what the default `auto`
emits where they fit) gives the same numbers as the generic fused op, unrolled and with
`--layer-loop`, and is a drop-in for the sharding pass (`--tp 2`)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import halo
from hf_reference import logits, make_model
from test_layer_loop import _build, _run
from test_llama_vs_hf import LENS, STRIDE


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_llama_paged")
    return d, make_model(d)


def _outputs(d, model, dtype, attention, loop=False):
    c = model.config
    page_elems = c.num_hidden_layers * 2 * c.num_key_value_heads * STRIDE * c.head_dim
    return _run(*_build(d, dtype, attention, loop), dtype, page_elems, c.vocab_size)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_paged_equals_fused(checkpoint, dtype):
    """Prefill + decode logits and the final cache, paged vs fused: bit for bit on CPU."""
    d, model = checkpoint
    fused, tokens = _outputs(d, model, dtype, "fused")
    paged, _ = _outputs(d, model, dtype, "paged")
    for step, (a, b) in enumerate(zip(fused, paged)):  # every step's logits, then the cache
        assert a.shape == b.shape
        assert np.array_equal(a, b), f"step {step}: paged differs by {np.abs(a - b).max()}"
    seqs = [list(tokens[b, :n]) for b, n in enumerate(LENS)]
    err = max(float(np.abs(paged[0][b, :LENS[b]] - logits(model, s)).max())
              for b, s in enumerate(seqs))
    assert err <= {"f32": 1e-3, "f16": 5e-2}[dtype]
    print(f"{dtype}: paged == fused bit for bit; max |paged - transformers| (prefill) {err:.3g}")


def test_paged_layer_loop_equals_unrolled(checkpoint):
    """`--attention paged --layer-loop`: the loop attends with the fused op over the
    read-only cache (kv_cache) and equals the unrolled paged program bit for bit."""
    d, model = checkpoint
    unrolled, _ = _outputs(d, model, "f32", "paged")
    looped, _ = _outputs(d, model, "f32", "paged", loop=True)
    for a, b in zip(unrolled, looped):
        assert np.array_equal(a, b), f"loop differs by {np.abs(a - b).max()}"


def test_paged_shards_over_two_devices(tmp_path):
    """The sharding pass splits the kernels' gather / attention / scatter by kv heads."""
    out = tmp_path / "tp2.mlir"
    proc = halo("emit", "--model", "toy", "--layers", 1, "--tp", 2, "--attention", "paged",
                "--bs-prefill", 1, "--bs-decode", 1, "-o", out)
    text = out.read_text()
    # one copy of each kernel per device, on its 4 of the 8 kv heads
    for kernel in ("paged_decode_attention", "paged_prefill_attention"):
        assert f"halo_{kernel}" in text and ".tp2." in text, proc.stderr
    assert "tensor<?x1x2x4x32x64xf16>" in text  # the cache shard, [P, 1 layer, 2, 4, 32, 64]
