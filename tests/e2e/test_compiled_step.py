"""The compiled step as the GPU would run it: toy models compiled for gfx942 to the stream
level (`--compile-to=stream`; only the compiler runs, on CPU), read per entry.

- No entry waits on the host: zero `stream.timepoint.await` in every prefill and decode
  entry, unrolled and `--layer-loop`, at TP1 and TP8.
- `--layer-loop` holds the layer body once: one loop (one `cf.cond_br`) in each entry at
  every TP degree (IREE's clone-to-consumers once copied a multi-device loop per consumer
  device: 3 loops at TP2, 9 at TP8), and the entry's dispatches do not grow with depth.
- The unrolled 8B-shaped decode step's dispatches per layer (3 layers minus 2) stay at or
  under what they are today (13 on 2026-11-29, IREE 3.13: 2 norms, 7 matmuls, RoPE for Q,
  the K/V page read-modify-write in 2, the attention with the page gathers fused in) and so
  do its submissions (1); the ceilings may only come down. No layer has index math of its
  own (integer-only dispatches): the gather rows of every layer are computed once per step
  (`kv_cache.decode_tables`; they were 3 dispatches a layer).
"""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import halo
from test_tp_stream import _entry_body

ENTRIES = ("prefill_bs4$async", "decode_bs4$async")


def _stream(tmp_path, *args, tp: int = 1) -> str:
    from halo_mlir.toolchain.compile import device_flags, iree_compile_binary

    tag = "_".join(str(a).lstrip("-") for a in args) + f"_tp{tp}"
    mlir, out = tmp_path / f"{tag}.mlir", tmp_path / f"{tag}.stream.mlir"
    if "--bs-decode" not in args:
        args = (*args, "--bs-decode", 4)
    halo("emit", *args, "--tp", tp, "--bs-prefill", 4, "-o", mlir)
    subprocess.run([iree_compile_binary(), str(mlir), *device_flags("gfx942", tp),
                    "--compile-to=stream", "-o", str(out)], check=True)
    return out.read_text()


@pytest.mark.parametrize("tp", [1, 8])
@pytest.mark.parametrize("loop", [False, True], ids=["unrolled", "loop"])
def test_no_host_waits_and_one_loop(tmp_path, tp, loop):
    flags = ["--layer-loop"] if loop else []
    text = _stream(tmp_path, "--model", "toy", "--layers", 2, *flags, tp=tp)
    deep = _stream(tmp_path, "--model", "toy", "--layers", 4, *flags, tp=tp) if loop else None
    for entry in ENTRIES:
        body = _entry_body(text, entry)
        assert body.count("stream.timepoint.await") == 0, f"{entry}: the host waits"
        if loop:
            assert body.count("cf.cond_br") == 1, f"{entry}: the layer loop is not there once"
            deeper = _entry_body(deep, entry)
            assert deeper.count("stream.cmd.dispatch ") == body.count("stream.cmd.dispatch "), \
                f"{entry}: the loop's dispatches grow with depth"


@pytest.mark.parametrize("bs", [4, 1])
def test_decode_dispatches_per_layer(tmp_path, bs):
    """At bs 1 too: batch-1 contractions stay generic (`--iree-opt-generalize-matmul` in the
    gfx942 flags; as named matvecs their rounding and residual adds were 5 more kernels)."""
    two, three = (_entry_body(_stream(tmp_path, "--model", "8b", "--layers", n,
                                      "--bs-decode", bs), f"decode_bs{bs}$async")
                  for n in (2, 3))
    per_layer = {k: three.count(k) - two.count(k)
                 for k in ("stream.cmd.dispatch ", "stream.cmd.execute ")}
    index_math = [len(_INDEX_MATH.findall(body)) for body in (two, three)]
    print(f"8B-shaped decode bs {bs}, TP1, per layer: {per_layer}; index-math dispatches at 2 and 3 "
          f"layers: {index_math}")
    assert per_layer["stream.cmd.dispatch "] <= 13
    assert per_layer["stream.cmd.execute "] <= 1
    assert index_math[0] == index_math[1] > 0, "index math per layer"


# A dispatch whose kernel only touches integers (its name's types: i64 / i1 only).
_INDEX_MATH = re.compile(r"stream\.cmd\.dispatch @\S+_((?:i64|i1|x)+)\[")


def test_fp8_dynamic_scales_per_decode_layer(tmp_path):
    """`--fp8-input-scales dynamic` (8B-shaped, fp8, decode bs 4): no host wait, and per
    layer at most 5 dispatches more than static scales (measured 2026-12-08, IREE 3.13: 18
    static, 23 dynamic; each of the layer's four linear inputs gets its row amax and its
    quantization as two dispatches, where static scales fuse the quantization into the
    producer; Q/K/V and gate/up share theirs)."""
    per_layer = {}
    for mode in ("static", "dynamic"):
        two, three = (_entry_body(_stream(tmp_path, "--model", "8b", "--layers", n, "--dtype",
                                          "fp8", "--fp8-input-scales", mode),
                                  "decode_bs4$async") for n in (2, 3))
        assert three.count("stream.timepoint.await") == 0, f"{mode}: the host waits"
        per_layer[mode] = three.count("stream.cmd.dispatch ") - two.count("stream.cmd.dispatch ")
    print(f"8B-shaped fp8 decode bs 4, dispatches per layer: {per_layer}")
    assert per_layer["dynamic"] <= per_layer["static"] + 5
