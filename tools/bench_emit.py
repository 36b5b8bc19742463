#!/usr/bin/env python3
"""Emission and gfx942 compile benchmarks; prints markdown tables for BENCHMARKS.md.

    python tools/bench_emit.py                 # emit 8b/70b/405b, compile 8b --layers 2/4
    python tools/bench_emit.py --quick         # tiny sizes, seconds (CI runs this)

Each measurement runs in its own process; peak RSS is that process's ru_maxrss.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one child process; raises if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024


def halo(*args) -> list[str]:
    return [sys.executable, "-m", "halo_mlir", *map(str, args)]


def iree_compile() -> str:
    from halo_mlir.compile import iree_compile_binary

    return iree_compile_binary()


def bench_emit(models, out: Path, repeats: int):
    print("| model | command | wall (s) | peak RSS (MB) | output (MB) |")
    print("|---|---|---|---|---|")
    for model, extra in models:
        path = out / f"{model}.mlir"
        args = ["emit", "--model", model, *extra, "-o", path]
        best = min((run(halo(*args)) for _ in range(repeats)), key=lambda r: r[0])
        size = path.stat().st_size / 1e6
        print(f"| {model} | `halo-mlir {' '.join(map(str, args[:-2]))}` | {best[0]:.2f} | "
              f"{best[1]:.0f} | {size:.1f} |")


def kernel_count(mlir: Path, flags: list[str], out: Path) -> int:
    sources = out / (mlir.stem + ".sources.mlir")
    subprocess.run([iree_compile(), str(mlir), *flags, "--compile-to=executable-sources",
                    "-o", str(sources)], check=True, stderr=subprocess.DEVNULL)
    return len(re.findall(r"hal\.executable private", sources.read_text()))


def bench_compile(model: str, layer_counts, target: str, out: Path):
    from halo_mlir.compile import target_flags

    flags = target_flags(target)
    print("\n| model | layers | target | iree-compile wall (s) | peak RSS (MB) | distinct kernels |")
    print("|---|---|---|---|---|---|")
    for layers in layer_counts:
        mlir = out / f"{model}-{layers}.mlir"
        run(halo("emit", "--model", model, "--layers", layers, "-o", mlir))
        wall, rss = run([iree_compile(), str(mlir), *flags, "-o", str(out / "x.vmfb")])
        kernels = kernel_count(mlir, flags, out)
        print(f"| {model} | {layers} | {target} | {wall:.1f} | {rss:.0f} | {kernels} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (for CI)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if args.quick:
            bench_emit([("toy", ["--layers", "2"]), ("405b", ["--layers", "2"])], out, 1)
            bench_compile("toy", [1, 2], "cpu", out)
        else:
            bench_emit([("8b", []), ("70b", []), ("405b", []),
                        ("405b", ["--bs-prefill", "1,4,8", "--bs-decode", "1,4,8"])], out, 3)
            bench_compile("8b", [2, 4], "gfx942", out)


if __name__ == "__main__":
    main()
