"""Kept-quantized mixture-of-experts: a Grok-shaped GGUF whose stacked experts are Q8_0,
Q4_1, Q4_K and Q6_K (tests/moeq_gguf.py), run with `--keep-quantized` (the experts' blocks
dequantized inside the expert kernels) and dequantized at import (gguf's own dequantization),
both at f32 activations on CPU: prefill (grouped, and with HALO_FULL=1 the gather form and
the layer loop) and decode logits agree within f32 rounding; at --tp 2 the kept-quantized
program equals the TP1 one within the TP tests' bound."""

from __future__ import annotations

import numpy as np
import pytest

import moeq_gguf as mq
from conftest import FULL, halo

STRIDE = 8
PAGES = 12
LENS = [13, 6]
PREFILL_LEN = 16
DECODE_STEPS = 3
BLOCK_IDS = np.array([[7, 2, 9, 5], [4, 11, 0, 3]], dtype=np.int64)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("moeq")
    mq.write(d / "mixed.gguf", mq.MIXED)
    mq.write(d / "uniform.gguf", mq.UNIFORM)
    return d


def _build(d, gguf: str, quantized: bool, prefill: str = "grouped", tp: int = 1,
           loop: bool = False):
    """Import (once per form), emit, compile: (vmfb, parameter files)."""
    tag = f"{gguf}_{'q' if quantized else 'f'}_tp{tp}{'_loop' if loop else ''}"
    irpa = d / f"{tag}.irpa"
    keep = ["--keep-quantized"] if quantized else []
    more = (["--layout", "stacked"] if loop else [])
    if not irpa.exists() and not (d / f"{tag}.rank0.irpa").exists():
        halo("import-params", "--gguf", d / f"{gguf}.gguf", "--dtype", "f32", "--tp", tp,
             *keep, *more, "-o", irpa)
    mlir, vmfb = d / f"{tag}_{prefill}.mlir", d / f"{tag}_{prefill}.vmfb"
    if not vmfb.exists():
        halo("emit", "--gguf", d / f"{gguf}.gguf", "--dtype", "f32", "--tp", tp, *keep,
             *(["--layer-loop"] if loop else []), "--moe-prefill", prefill,
             "--bs-prefill", 2, "--bs-decode", 2, "--block-seq-stride", STRIDE, "-o", mlir)
        halo("compile", mlir, "--target", "cpu", "--tp", tp, "-o", vmfb)
    return vmfb, [d / f"{tag}.rank{i}.irpa" for i in range(tp)] if tp > 1 else [irpa]


def _logits(vmfb, params, tp: int = 1) -> list[np.ndarray]:
    """Prefill two right-padded rows, then decode steps over shuffled pages: each call's
    logits (the real positions only)."""
    from halo_mlir.inference.runtime import Program

    rng = np.random.default_rng(3)
    tokens = rng.integers(0, mq.V, size=(2, PREFILL_LEN)).astype(np.int64)
    page_elems = mq.L * 2 * mq.KV * STRIDE * mq.HD
    out = []
    with Program(vmfb, params, n_devices=tp) as prog:
        caches = [prog.device_array(np.zeros((PAGES, page_elems // tp), np.float32), i)
                  for i in range(tp)]
        logits = prog.prefill(tokens, np.array(LENS, np.int64),
                              BLOCK_IDS[:, :PREFILL_LEN // STRIDE].copy(), caches)
        out += [logits[b, :n].copy() for b, n in enumerate(LENS)]
        start = np.array(LENS, np.int64)
        for _ in range(DECODE_STEPS):
            new = rng.integers(0, mq.V, size=(2, 1)).astype(np.int64)
            out.append(prog.decode(new, start + 1, start, BLOCK_IDS, caches)[:, 0].copy())
            start = start + 1
        del caches
    return out


def _compare(got, want):
    """(max |got - want| over prefill, over decode, max |logit|)."""
    pre = max(float(np.abs(g - w).max()) for g, w in zip(got[:2], want[:2]))
    dec = max(float(np.abs(g - w).max()) for g, w in zip(got[2:], want[2:]))
    return pre, dec, max(float(np.abs(w).max()) for w in want)


@pytest.mark.parametrize("gguf,prefill,loop", [("mixed", "grouped", False)] + (
    [("mixed", "gather", False), ("uniform", "grouped", True)] if FULL else []))
def test_native_experts_equal_dequantized(files, gguf, prefill, loop):
    """Every expert format natively (the expert decode kernel, and the dense kernels per
    expert in the grouped prefill) against the same model dequantized by gguf at import."""
    native = _logits(*_build(files, gguf, True, prefill, loop=loop))
    ref = _logits(*_build(files, gguf, False, prefill, loop=loop))
    pre, dec, scale = _compare(native, ref)
    print(f"{gguf} {prefill}{' --layer-loop' * loop}: logits up to {scale:.3g}; max |native - "
          f"dequantized| prefill {pre:.3g}, decode {dec:.3g}")
    assert scale > 0.5  # logits of a useful size
    assert pre <= 1e-4 * max(scale, 1.0) and dec <= 1e-4 * max(scale, 1.0)
    # The routing matters: equal logits from different expert weights would hide a misread
    # expert. Decoding from another token changes them by far more than the bound.
    assert max(float(np.abs(a - b).max()) for a, b in zip(ref[2:], ref[3:])) > 0.1


def test_keep_quantized_experts_tp2_equals_tp1(files):
    """--tp 2: each expert's fields split like its matrix (gate/up rows, down's blocks: 2
    super-blocks of 256, one a device)."""
    one = _logits(*_build(files, "mixed", True))
    two = _logits(*_build(files, "mixed", True, tp=2), tp=2)
    pre, dec, scale = _compare(two, one)
    print(f"mixed TP2 vs TP1 (kept quantized): logits up to {scale:.3g}; max |TP2 - TP1| "
          f"prefill {pre:.3g}, decode {dec:.3g}")
    assert max(pre, dec) <= 2e-5
