"""What the GPU runs for the all-reduces: toy TP8 decode (bs 4) compiled for gfx942 to the
stream level (`--compile-to=stream`, only the compiler: runs on CPU), counted per device per
layer as the difference between 3 and 2 layers (what IREE inlines, fuses, clones and copies
shows only there: the source IR hides it).

`--allreduce auto` one-shots decode's all-reduces: each device receives the 7 other partial
sums (2 all-reduces a layer: 14 cross-device copies, nothing else copied) and adds them in
the dispatch of the residual add that consumes them: no slice, concatenation or sum of its
own. Measured 2026-11-29 (IREE 3.13): 23 dispatches, 14 copies, 5 submissions per device per
layer (before: 57, 28, 6.75 with the reduce-scatter + all-gather over strided chunks); with
the decode step's own changes since (no host waits, K/V written together, RoPE without
copies): 18 dispatches and 3 submissions; with every layer's gather rows computed once per
step: 15. The ceilings below are those numbers: they may only come down.
"""

from __future__ import annotations

import re
import subprocess

from conftest import halo

TP = 8


def _entry_body(text: str, entry: str) -> str:
    body = text[text.index(f"util.func public @{entry}("):]
    return body[:body.index("\n  }\n")]


def _stream(tmp_path, layers: int, dtype: str = "f16", bs: int = 4) -> str:
    from halo_mlir.toolchain.compile import device_flags, iree_compile_binary

    tag = f"l{layers}{dtype}bs{bs}"
    mlir, out = tmp_path / f"{tag}.mlir", tmp_path / f"{tag}.stream.mlir"
    halo("emit", "--model", "toy", "--layers", layers, "--tp", TP, "--dtype", dtype,
         "--bs-prefill", 4, "--bs-decode", bs, "-o", mlir)
    subprocess.run([iree_compile_binary(), str(mlir), *device_flags("gfx942", TP),
                    "--compile-to=stream", "-o", str(out)], check=True)
    return _entry_body(out.read_text(), f"decode_bs{bs}$async")


def _counts(body: str) -> dict:
    kinds = re.findall(r"stream\.cmd\.dispatch @[\w$.]+::@[\w$.]+?_dispatch_\d+_(\w+)", body)
    return {"dispatches": body.count("stream.cmd.dispatch "),
            "copies": body.count("stream.cmd.copy "),
            "submissions": body.count("stream.cmd.execute "),
            "memcpy dispatches": sum(k == "slow_memcpy" for k in kinds),
            "sums of 8 partials": len(re.findall(
                r"stream\.cmd\.dispatch [^\n]*elementwise[^\n]*\{\n(?:\s+ro [^\n]+\n){9}\s+wo",
                body))}


def test_one_shot_decode_at_the_stream_level(tmp_path):
    two, three = _counts(_stream(tmp_path, 2)), _counts(_stream(tmp_path, 3))
    per = {k: (three[k] - two[k]) / TP for k in two}
    print(f"toy TP{TP} decode bs4, per device per layer: {per}")
    assert per["copies"] == 2 * (TP - 1)  # one-shot: N-1 in per all-reduce, nothing else
    assert per["memcpy dispatches"] == 0  # no slicing or concatenation kernels
    # each all-reduce's sum reads the 8 partials and the residual: fused with the add
    assert per["sums of 8 partials"] == 2
    assert per["dispatches"] <= 15 and per["submissions"] <= 3


def test_one_shot_decode_at_batch_one(tmp_path):
    """bs 1 (the latency case): the same kernels as bs 4 (batch-1 contractions stay generic,
    see compile.py's gfx942 flags: 20 kernels before), the same one-shot copies."""
    two, three = (_counts(_stream(tmp_path, n, bs=1)) for n in (2, 3))
    per = {k: (three[k] - two[k]) / TP for k in two}
    print(f"toy TP{TP} decode bs1, per device per layer: {per}")
    assert per["copies"] == 2 * (TP - 1) and per["memcpy dispatches"] == 0
    assert per["dispatches"] <= 15 and per["submissions"] <= 3


def test_fp8_decode_all_reduces_one_shot(tmp_path):
    """The fp8 matmul kernel returns its partial sums (scaled and rounded on each device) to
    the caller, which all-reduces them at decode's static size: one-shot, as f16 (they were
    reduce-scattered inside the kernel at its dynamic rows: 28 copies a layer)."""
    two, three = (_counts(_stream(tmp_path, n, "fp8")) for n in (2, 3))
    per = {k: (three[k] - two[k]) / TP for k in two}
    print(f"toy fp8 TP{TP} decode bs4, per device per layer: {per}")
    assert per["copies"] == 2 * (TP - 1)
    assert per["submissions"] <= 3

