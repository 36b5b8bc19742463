"""`halo-mlir profile` on this CPU: what the runtime executes per decode (and prefill) call,
measured with IREE's HAL profiling, equals what `cost` reads from the compiled program's
stream IR (dispatches per device, copies, and their per-layer difference), for dense and
mixture-of-experts models, TP1 and TP2, unrolled and as a layer loop, toy and 8B-shaped;
every measured dispatch is named by the op that emitted it. Parameters are splats of the
module's shapes (--random-params)."""

from __future__ import annotations

import json

import pytest

from conftest import halo

# A small Mixtral (head_dim 16, 3 query heads per kv head, 4 experts, top 2). Its prefill is
# emitted in the gather form: the grouped form's dispatches depend on the routing.
MOE = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu",
       "hidden_size": 64, "intermediate_size": 48, "num_attention_heads": 6,
       "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4,
       "num_experts_per_tok": 2, "num_hidden_layers": 3, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
       "max_position_embeddings": 4096, "tie_word_embeddings": False, "vocab_size": 128}
# (name, model flags, tp, layer loop)
CASES = [("toy", ["--model", "toy"], 1, False), ("toy", ["--model", "toy"], 2, False),
         ("toy", ["--model", "toy"], 1, True),
         ("moe", ["--hf-config", "MOE", "--moe-prefill", "gather"], 1, False),
         ("moe", ["--hf-config", "MOE", "--moe-prefill", "gather"], 2, False), ("8b", ["--model", "8b"], 1, False)]


def build(d, name, flags, tp, loop, layers):
    flags = [str(d / "moe.json") if f == "MOE" else f for f in flags]
    stem = d / f"{name}-tp{tp}{'-loop' if loop else ''}-{layers}"
    mlir, vmfb, config = (stem.with_suffix(s) for s in (".mlir", ".vmfb", ".json"))
    if not vmfb.exists():
        halo("emit", *flags, "--layers", layers, "--tp", tp, *(["--layer-loop"] * loop),
             "--bs-prefill", 2, "--bs-decode", 2, "-o", mlir, "--output-config", config)
        halo("compile", mlir, "--tp", tp, "-o", vmfb)
    return mlir, vmfb, config


def measure(d, name, flags, tp, loop, layers):
    mlir, vmfb, config = build(d, name, flags, tp, loop, layers)
    out = d / f"{vmfb.stem}.profile.json"
    halo("profile", vmfb, "--config", config, "--random-params", "--source", mlir,
         "--steps", 2, "--prompt-len", 40, "--json", out)
    cost = json.loads(halo("cost", mlir, "--target", "cpu", "--tp", tp, "--context", 41,
                           "--json").stdout)
    entries = {e["entry"].split("$")[0].split("_bs")[0]: e for e in cost["entries"]}
    return json.loads(out.read_text()), entries


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("profile")
    (d / "moe.json").write_text(json.dumps(MOE))
    return d


@pytest.mark.parametrize("name,flags,tp,loop", CASES,
                         ids=[f"{c[0]}-tp{c[2]}{'-loop' if c[3] else ''}" for c in CASES])
def test_measured_counts_equal_the_compiled_programs(work, name, flags, tp, loop):
    runs = {}
    for layers in ((2,) if loop else (2, 3)):
        report, cost = measure(work, name, flags, tp, loop, layers)
        for call in ("prefill", "decode"):
            got, read = report[call], cost[call]["total"]
            assert len(got["dispatches_per_step"]) == tp
            assert sum(got["dispatches_per_step"]) == read["dispatches"], (call, got, read)
            assert got["copies_per_step"] == read["cross_copies"] + read["local_copies"]
            assert all(e["name"] != e["export"] or e["kind"] == "copy kernel"
                       for e in got["dispatches"]), "unnamed"
        runs[layers] = (report, cost)
    decode = runs[2][0]["decode"]
    layers = {e["layer"] for e in decode["dispatches"] if e["layer"] is not None}
    assert layers == {0, 1}
    assert {"q proj", "attention", "lm_head", "norm"} <= set(decode["kinds"])
    # a dense FFN's gate and up are linears of the block; a mixture's run inside its experts
    assert ("gate/up" in decode["kinds"]) == (name != "moe")
    if not loop:  # one more layer: the measured difference is cost's per-layer count
        (big, big_cost), (small, small_cost) = runs[3], runs[2]
        for call in ("prefill", "decode"):
            per_layer = sum(big[call]["dispatches_per_step"]) - \
                sum(small[call]["dispatches_per_step"])
            assert per_layer == big_cost[call]["total"]["dispatches"] - \
                small_cost[call]["total"]["dispatches"] > 0
    else:
        assert runs[2][1]["decode"]["loop_trips"] == 2


def assert_one_line_error(proc, *needles):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and lines[-1].startswith("error: "), proc.stderr
    assert all(n in lines[-1] for n in needles), (needles, lines[-1])


def test_threads_bound_the_cpu_workers(work):
    """--threads 1: one local-task worker, so no dispatch's tiles overlap in time (the sum of
    its tiles' durations stays within its span; with a worker per core a multi-tile dispatch
    sums up to twice its span on two cores)."""
    from halo_mlir.inference.profile import calls_for, random_parameters, read_events, \
        run_profiled

    mlir, vmfb, config = build(work, "toy", ["--model", "toy"], 1, False, 2)
    out = work / "threads.json"
    proc = halo("profile", vmfb, "--config", config, "--random-params", "--source", mlir,
                "--steps", 1, "--threads", 1, "--json", out)
    assert json.loads(out.read_text())["threads"] == 1 and "1 worker thread(s)" in proc.stdout
    params = [random_parameters(mlir, work / "threads.irpa")]
    prefill, _ = calls_for(json.loads(config.read_text()), 2, 40, work)
    run_profiled(vmfb, params, 1, "cpu", prefill, 2, work / "threads.ireeprof", threads=1)
    events, _ = read_events(work / "threads.ireeprof")
    tiled = [e for e in events if int(e["tile_count"]) > 1]
    assert len(tiled) > 10
    assert all(int(e["tile_duration_sum_ns"]) <= int(e["duration_ns"]) for e in tiled)


def test_bad_input(work):
    mlir, vmfb, config = build(work, "toy", ["--model", "toy"], 2, False, 2)
    other = build(work, "toy", ["--model", "toy"], 1, False, 2)
    base = ["profile", vmfb, "--config", config]
    assert_one_line_error(halo(*base, "--random-params", "--source", mlir, "--steps", 0,
                               check=False), "--steps must be at least 1")
    for bad in (["--threads", 0], ["--threads", 2, "--device", "cuda"]):
        assert_one_line_error(halo(*base, "--random-params", "--source", mlir, *bad,
                                   check=False), "--threads", "--device cpu")
    assert_one_line_error(halo(*base, check=False), "--params", "--random-params")
    assert_one_line_error(halo("profile", work / "missing.vmfb", "--config", config,
                               "--random-params", "--source", mlir, check=False),
                          "missing.vmfb: no such file")
    assert_one_line_error(halo("profile", config, "--config", config, "--random-params",
                               "--source", mlir, check=False), "compiled module")
    assert_one_line_error(halo(*base, "--random-params", check=False), "--source")
    assert_one_line_error(halo(*base, "--random-params", "--source", mlir, "--bs", 3,
                               check=False), "bs3", "--bs")
    # the config of a 1-device module with a 2-device one: the devices do not match
    assert_one_line_error(halo("profile", vmfb, "--config", other[2], "--random-params",
                               "--source", other[0], check=False), "profiling")
    # parameters that are not the module's
    empty = work / "empty.irpa"
    import iree.runtime as rt
    import numpy as np
    rt.save_archive_file({"x": np.zeros(4, np.float32)}, str(empty))
    assert_one_line_error(halo("profile", other[1], "--config", other[2], "--params", empty,
                               check=False), "profiling")


def test_device_check_dry_run_on_cpu(tmp_path):
    """tools/bench/device.py --device cpu --quick: the GPU check's whole path here (toy, 2
    and 3 layers): measured, estimated and roofline step times, per layer, the suggested
    launch constant."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "tools" / "bench" / "device.py"
    out = tmp_path / "dry.json"
    proc = subprocess.run([sys.executable, str(script), "--device", "cpu", "--quick",
                           "--steps", "2", "-o", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    small, big = r["depths"]
    assert (small["layers"], big["layers"]) == (2, 3)
    assert big["dispatches"] > small["dispatches"] > 0
    for row in (small, big):
        assert row["measured_step_ms"] >= row["measured_dispatch_ms"] > 0
        assert row["estimated_step_ms"] > row["roofline_ms"] > 0
    # the measured per-layer difference is noise-sized for the toy on shared cores; the
    # estimate's is not
    assert r["per_layer"]["estimated_step_ms"] > 0 and r["suggested"]["kernel_launch_s"] > 0
    assert "calibrated: mi300x (cpu)" in proc.stdout


def test_perfetto_trace_or_one_line_error(work):
    """--perfetto writes a trace where the perfetto package is installed (the `profile`
    extra), and says how to get it in one line where not."""
    import importlib.util

    mlir, vmfb, config = build(work, "toy", ["--model", "toy"], 1, False, 2)
    out = work / "decode.pftrace"
    proc = halo("profile", vmfb, "--config", config, "--random-params", "--source", mlir,
                "--steps", 1, "--perfetto", out, check=False)
    if importlib.util.find_spec("perfetto") is None:
        assert_one_line_error(proc, "perfetto", "pip install")
        assert not out.exists()
    else:
        assert proc.returncode == 0, proc.stderr
        assert out.stat().st_size > 1000
