"""`--layer-loop`: the decoder stack as one scf.for over stacked weights.

- its logits and cache equal the unrolled program's (f32 and f16, fused and decomposed
  attention: bit for bit on CPU) and transformers' within the core tolerance;
- sharded over 8 local devices it equals the TP1 unrolled program within test_tp's bound;
- no decode step (unrolled or loop) copies the KV cache (`--compile-to=stream`);
- a parameter file in the other layout is a clear error at load time.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from conftest import halo
from hf_reference import logits, make_model
from test_llama_vs_hf import BLOCK_IDS, LENS, PAGES, PREFILL_LEN, STRIDE
from test_tp import DECODE_STEPS, TP_BOUND, build as build_tp, run as run_tp


def _build(d, dtype: str, attention: str, loop: bool):
    tag = f"{dtype}_{attention}_{'loop' if loop else 'unrolled'}"
    irpa = d / f"w_{dtype}_{'stacked' if loop else 'layers'}.irpa"
    if not irpa.exists():
        halo("import-params", "--safetensors", d, "--dtype", dtype, "--layout",
             "stacked" if loop else "per-layer", "-o", irpa)
    halo("emit", "--hf-config", d / "config.json", "--dtype", dtype, "--attention", attention,
         *(["--layer-loop"] if loop else []), "--bs-prefill", 2, "--bs-decode", 2,
         "--block-seq-stride", STRIDE, "-o", d / f"{tag}.mlir")
    halo("compile", d / f"{tag}.mlir", "--target", "cpu", "-o", d / f"{tag}.vmfb")
    return d / f"{tag}.vmfb", irpa


def _run(vmfb, irpa, dtype, page_elems, vocab):
    """Prefill two right-padded rows, then decode steps: every logits array and the cache."""
    from halo_mlir.inference.runtime import Program

    rng = np.random.default_rng(1)
    tokens = rng.integers(0, vocab, size=(2, PREFILL_LEN)).astype(np.int64)
    np_dtype = {"f32": np.float32, "f16": np.float16}[dtype]
    outs = []
    with Program(vmfb, [irpa]) as prog:
        cache = prog.device_array(np.zeros((PAGES, page_elems), np_dtype))
        outs.append(prog.prefill(tokens, np.array(LENS, np.int64),
                                 BLOCK_IDS[:, :PREFILL_LEN // STRIDE].copy(), [cache]))
        lens = np.array(LENS, np.int64)
        for _ in range(DECODE_STEPS):
            new = rng.integers(0, vocab, size=(2, 1)).astype(np.int64)
            outs.append(prog.decode(new, lens + 1, lens, BLOCK_IDS, [cache]))
            lens = lens + 1
        outs.append(cache.to_host())
    return outs, tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_llama_loop")
    return d, make_model(d)


@pytest.mark.parametrize("dtype,attention", [("f32", "fused"), ("f16", "decomposed")])
def test_loop_equals_unrolled_and_transformers(checkpoint, dtype, attention):
    d, model = checkpoint
    c = model.config
    page_elems = c.num_hidden_layers * 2 * c.num_key_value_heads * STRIDE * c.head_dim
    unrolled, tokens = _run(*_build(d, dtype, attention, False), dtype, page_elems,
                            c.vocab_size)
    looped, _ = _run(*_build(d, dtype, attention, True), dtype, page_elems, c.vocab_size)
    for a, b in zip(unrolled, looped):  # every step's logits, then the whole cache
        assert a.shape == b.shape
        assert np.array_equal(a, b), f"loop differs from unrolled by {np.abs(a - b).max()}"
    # and transformers, within the core tolerance
    bound = {"f32": 1e-3, "f16": 5e-2}[dtype]
    seqs = [list(tokens[b, :n]) for b, n in enumerate(LENS)]
    err = max(float(np.abs(looped[0][b, :LENS[b]] - logits(model, s)).max())
              for b, s in enumerate(seqs))
    print(f"{dtype} {attention}: loop == unrolled bit for bit; max |loop - transformers| "
          f"(prefill) = {err:.3g}")
    assert err <= bound


def test_loop_on_8_devices_matches_tp1(tmp_path):
    tp = 8
    model = make_model(tmp_path, seed=tp, num_key_value_heads=tp, num_attention_heads=3 * tp)
    c = model.config
    page_elems = c.num_hidden_layers * 2 * c.num_key_value_heads * STRIDE * c.head_dim
    one, _ = run_tp(*build_tp(tmp_path, 1), 1, page_elems, c.vocab_size)
    many, _ = run_tp(*build_tp(tmp_path, tp, layer_loop=True), tp, page_elems, c.vocab_size)
    err = max(float(np.abs(a - b).max()) for a, b in zip(one, many))
    print(f"--layer-loop --tp {tp}: max |logits - TP1 unrolled| = {err:.3g}")
    assert err <= TP_BOUND


def _cache_copies(mlir, tmp_path) -> tuple[int, int]:
    """(copies of external resources, all copies) in the decode step at the stream level:
    the cache is imported, so a copy of it copies an external resource."""
    from halo_mlir.toolchain.compile import device_flags, iree_compile_binary

    out = tmp_path / f"{mlir.stem}.stream.mlir"
    subprocess.run([iree_compile_binary(), str(mlir), *device_flags("cpu", 1),
                    "--compile-to=stream", "-o", str(out)], check=True)
    text = out.read_text()
    decode = text[text.index("util.func public @decode_bs2$async"):]
    decode = decode[:decode.index("\n  }\n")]
    copies = [line for line in decode.splitlines() if "stream.cmd.copy" in line
              or "stream.async.copy" in line]
    return len([line for line in copies if "external" in line]), len(copies)


@pytest.mark.parametrize("loop", [False, True], ids=["unrolled", "loop"])
def test_decode_does_not_copy_the_cache(tmp_path, loop):
    make_model(tmp_path)
    mlir = tmp_path / "m.mlir"
    halo("emit", "--hf-config", tmp_path / "config.json", "--dtype", "f16",
         *(["--layer-loop"] if loop else []), "--bs-prefill", 2, "--bs-decode", 2,
         "--block-seq-stride", STRIDE, "-o", mlir)
    external, total = _cache_copies(mlir, tmp_path)
    assert external == 0, f"the decode step copies an external (cache) resource {external} times"
    print(f"{'loop' if loop else 'unrolled'}: {total} copies in the decode step, none of the cache")


def test_layout_mismatch_is_a_clear_error(checkpoint):
    from halo_mlir.errors import HaloError
    from halo_mlir.inference.runtime import Program

    d, _ = checkpoint
    vmfb_loop, stacked = _build(d, "f32", "fused", True)
    vmfb_unrolled, layers = _build(d, "f32", "fused", False)
    with pytest.raises(HaloError, match="import them with `halo-mlir import-params --layout stacked`"):
        Program(vmfb_loop, [layers])
    with pytest.raises(HaloError, match="files hold the stacked layout"):
        Program(vmfb_unrolled, [stacked])
