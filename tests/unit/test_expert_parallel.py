"""Expert parallelism (`--moe-parallel expert`): whole experts per device. Emission (the
experts split along the expert dim, the router replicated, one all-reduce per block as in
`ffn` mode), rank files (rank r holds experts [r*E/N, (r+1)*E/N) whole, checked against
the checkpoint's tensors), the plan per mode (against numbers worked out from Grok-1's
published shapes), and the one-line errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from conftest import halo
from test_cli_errors import assert_one_line_error
from test_moe import TINY, _tiny_checkpoint

from halo_mlir.analysis.capacity import plan
from halo_mlir.config import preset


def test_emit_holds_whole_experts_per_device(tmp_path):
    """--tp 2: device i's experts are [4, ffn, hidden] whole (`KEY.expert_shard.i`), the
    router is replicated, one all-reduce per block (attention, experts) and entry; the
    module is the same bytes twice."""
    a, b = tmp_path / "a.mlir", tmp_path / "b.mlir"
    for out in (a, b):
        proc = halo("emit", "--model", "mixtral-8x7b", "--layers", "1", "--tp", "2",
                    "--moe-parallel", "expert", "-o", out)
    assert a.read_bytes() == b.read_bytes()
    text = a.read_text()
    for i in range(2):
        for kind, shape in (("gate", "4x14336x4096"), ("up", "4x14336x4096"),
                            ("down", "4x4096x14336")):
            assert (f'"model"::"blk.0.ffn_{kind}_exps.weight.expert_shard.{i}"> : '
                    f'tensor<{shape}xf16>') in text
    assert '_exps.weight.shard.' not in "".join(re.findall(r'"model"::"[^"]+"', text))
    assert text.count('"model"::"blk.0.ffn_gate_inp.weight"> : tensor<8x4096xf16>') == 2
    assert "prefill_bs4: " in proc.stderr and "2 all-reduces" in proc.stderr
    assert "experts: 4 of 8 whole per device (--moe-parallel expert)" in proc.stderr


def test_ffn_mode_is_the_default(tmp_path):
    """`--moe-parallel ffn` is what `--tp` did before: the same bytes as no option."""
    a, b = tmp_path / "a.mlir", tmp_path / "b.mlir"
    halo("emit", "--model", "mixtral-8x7b", "--layers", "1", "--tp", "2", "-o", a)
    halo("emit", "--model", "mixtral-8x7b", "--layers", "1", "--tp", "2", "--moe-parallel",
         "ffn", "-o", b)
    assert a.read_bytes() == b.read_bytes()
    assert "expert_shard" not in a.read_text()


def _checkpoint(d, experts=4):
    """test_moe's random Mixtral checkpoint with `experts` experts."""
    return _tiny_checkpoint(d, hf={**TINY, "num_local_experts": experts})


@pytest.mark.parametrize("layout", ["per-layer", "stacked"])
def test_import_writes_whole_experts_per_rank(tmp_path, layout):
    """`import-params --tp 2 --moe-parallel expert`: rank r holds experts 2r and 2r+1 whole
    (gate, up, down) of every layer, under `KEY.expert_shard.r`; the router once."""
    import iree.runtime as rt

    tensors = _checkpoint(tmp_path)
    halo("import-params", "--safetensors", tmp_path, "--dtype", "f32", "--tp", 2,
         "--moe-parallel", "expert", "--layout", layout, "-o", tmp_path / "s.irpa")
    f, h = TINY["intermediate_size"], TINY["hidden_size"]
    for r in range(2):
        index = rt.ParameterIndex()
        index.load(str(tmp_path / f"s.rank{r}.irpa"))
        got = {k: np.frombuffer(memoryview(v.file_view), np.float32) for k, v in index.items()}
        assert not any(".shard." in k and "_exps" in k for k in got)
        for layer in range(2):
            key = ("blk.{}.weight.stacked" if layout == "stacked" else f"blk.{layer}.{{}}.weight")
            router = key.format("ffn_gate_inp")
            assert (router in got) == (r == 0)
            for kind, hf, shape in (("ffn_gate_exps", "w1", (2, f, h)),
                                    ("ffn_up_exps", "w3", (2, f, h)),
                                    ("ffn_down_exps", "w2", (2, h, f))):
                w = got[key.format(kind) + f".expert_shard.{r}"]
                w = w.reshape(2, *shape)[layer] if layout == "stacked" else w.reshape(shape)
                for j in range(2):
                    e = 2 * r + j
                    np.testing.assert_array_equal(
                        w[j], tensors[f"model.layers.{layer}.block_sparse_moe.experts.{e}."
                                      f"{hf}.weight"])


@pytest.mark.parametrize("argv,needles", [
    (["emit", "--model", "mixtral-8x7b", "--layers", "1", "--tp", "3", "--moe-parallel",
      "expert"], ["--tp 3 does not divide the 8 experts of mixtral-8x7b",
                  "use --tp among [1, 2, 4, 8], or --moe-parallel ffn"]),
    (["emit", "--model", "toy", "--layers", "1", "--tp", "2", "--moe-parallel", "expert"],
     ["--moe-parallel expert applies to mixture-of-experts models", "drop --moe-parallel"]),
    (["plan", "--model", "grok-1", "--tp", "3", "--moe-parallel", "expert"],
     ["does not divide the 8 experts of grok-1"]),
    (["plan", "--model", "8b", "--moe-parallel", "expert"], ["8b is dense"]),
])
def test_bad_moe_parallel_is_one_line(tmp_path, argv, needles):
    out = tmp_path / "x.mlir"
    proc = halo(*argv, *(["-o", out] if argv[0] == "emit" else []), check=False)
    assert_one_line_error(proc, *needles)
    assert not out.exists()


def test_import_refuses_experts_that_do_not_divide(tmp_path):
    _checkpoint(tmp_path, experts=3)
    out = tmp_path / "m.irpa"
    proc = halo("import-params", "--safetensors", tmp_path, "--tp", 2, "--moe-parallel",
                "expert", "-o", out, check=False)
    assert_one_line_error(proc, "--tp 2 does not divide the 3 experts")
    assert not list(tmp_path.glob("m*.irpa"))


# Grok-1's published shapes: hidden 6144, expert ffn 32768, 8 experts (top 2), 64 layers.
D, F, E, LAYERS = 6144, 32768, 8, 64
EXPERT_BYTES = 3 * D * F * 2  # gate, up, down of one expert, f16


@pytest.mark.parametrize("batch", [1, 4])
def test_plan_per_mode(batch):
    """Both modes hold the same bytes per device (every expert's 1/8, or 1 of the 8 whole);
    a decode step reads, per device and layer, the picked share of its rows (ffn: the
    expected distinct experts of `batch` tokens, 1 - (1 - 2/8)^batch of 8, over 8 devices)
    or its one whole expert (expert: picked or not)."""
    ffn, ep = (plan(preset("grok-1"), tp=8, batch=batch, moe_parallel=m) for m in ("ffn", "expert"))
    assert ep.weight_bytes == ffn.weight_bytes
    assert ep.experts["whole_experts_held"] == 1 and ffn.experts["whole_experts_held"] == 0
    picked = 1 - (1 - 2 / 8) ** batch
    assert ffn.experts["decode_experts_read"] == pytest.approx(picked * E / 8)
    assert ep.experts["decode_experts_read"] == 1
    extra = LAYERS * EXPERT_BYTES * (1 - picked)
    assert ep.decode.bytes_read - ffn.decode.bytes_read == pytest.approx(extra, abs=LAYERS)
    # every local expert runs over every token: E/k times the picked experts' FLOPs
    expert_flops = 2 * batch * LAYERS * EXPERT_BYTES // 2
    assert ep.decode.flops - ffn.decode.flops == pytest.approx(
        expert_flops - expert_flops * 2 / 8, rel=1e-9)


def test_plan_cli_names_the_mode():
    proc = halo("plan", "--model", "grok-1", "--tp", "8", "--moe-parallel", "expert")
    assert "--moe-parallel expert: 1 of 8 whole experts per device" in proc.stdout
    data = json.loads(halo("plan", "--model", "grok-1", "--tp", "8", "--json").stdout)
    assert data["experts"]["moe_parallel"] == "ffn"
    assert json.loads(halo("plan", "--model", "8b", "--json").stdout).get("experts") is None
