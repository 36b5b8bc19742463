#!/usr/bin/env python3
"""SmolLM2-135M on CPU served by shortfin: time to first token and decode tokens/s, next to
`halo-mlir generate` on the same machine.

    python tools/bench_shortfin.py [--python .venv-shortfin/bin/python] [--tokens 64]

Run by the main environment's python (IREE 3.13). It exports SmolLM2 with the shortfin
environment's `halo-mlir export-shortfin` (IREE 3.9; f32, bs 1,4), serves it with the printed
command on a free port, and times requests of one prompt:
- TTFT: a request for 1 token (tokenize, prefill, first token, HTTP round trip);
- decode tokens/s: (N - 1) / (time of an N-token request - TTFT), N the tokens it returned.
Each figure is the median of --repeat requests after one warm-up. Then `halo-mlir generate`
reports its own first-token time and tokens/s for the same prompt (the median of --repeat
runs): once in this environment (its own IREE 3.13 module, bs 1, f32) and once in the shortfin
environment with the exported files (the very module shortfin runs).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"


def post(port, text, n):
    """(seconds, generated token ids) of one request."""
    body = {"text": text, "sampling_params": {"max_completion_tokens": n},
            "return_input_ids": True}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.loads(r.read())
    return time.perf_counter() - start, out[0]


def generate_rate(python, args, tokens, repeat):
    """(first token s, tokens/s) medians from `halo-mlir generate`'s own report."""
    firsts, rates = [], []
    for _ in range(repeat + 1):  # the first run may compile
        proc = subprocess.run([python, "-m", "halo_mlir", "generate", "--raw", "--prompt", PROMPT,
                               "--max-tokens", str(tokens), *args], capture_output=True,
                              text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr)
        m = re.search(r"first token ([\d.]+) s, then ([\d.]+) tokens/s", proc.stderr)
        firsts.append(float(m[1]))
        rates.append(float(m[2]))
    return statistics.median(firsts[1:]), statistics.median(rates[1:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--python", default=str(ROOT / ".venv-shortfin" / "bin" / "python"))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from halo_mlir.inference.generate import default_gguf

    gguf = default_gguf()
    work = Path(tempfile.mkdtemp(prefix="bench-shortfin-"))
    out = work / "smollm2"
    start = time.perf_counter()
    proc = subprocess.run([a.python, "-m", "halo_mlir", "export-shortfin", "--gguf", gguf,
                           "--out", str(out), "--bs", "1,4"], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    print(f"export-shortfin: {time.perf_counter() - start:.1f} s")
    args = shlex.split(proc.stdout.strip().splitlines()[-1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args[args.index("--port") + 1] = str(port)
    log = open(work / "server.log", "w")
    # The printed command through the tests' launcher: it only makes shortfin 3.9.0's
    # `return_input_ids` answers encodable, so the generated tokens can be counted.
    launcher = ROOT / "tests" / "e2e" / "shortfin_launcher.py"
    server = subprocess.Popen([a.python, str(launcher), *args[3:]], stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                time.sleep(1)
        post(port, PROMPT, a.tokens)  # warm-up
        ttft = statistics.median(post(port, PROMPT, 1)[0] for _ in range(a.repeat))
        runs = [post(port, PROMPT, a.tokens) for _ in range(a.repeat)]
        total = statistics.median(t for t, _ in runs)
        n = len(runs[0][1])  # fewer than asked when the model ends (EOS)
        print(f"shortfin (IREE 3.9 module, local-task): TTFT {ttft * 1e3:.0f} ms, decode "
              f"{(n - 1) / (total - ttft):.1f} tokens/s ({n} tokens in {total:.2f} s)")
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    first, rate = generate_rate(sys.executable, [], a.tokens, a.repeat)
    print(f"halo-mlir generate (IREE 3.13, own bs-1 module): first token {first * 1e3:.0f} ms, "
          f"decode {rate:.1f} tokens/s")
    files = ["--vmfb", out / "model.vmfb", "--params", out / "model.irpa", "--config",
             out / "config.json", "--tokenizer", out / "tokenizer.json"]
    first, rate = generate_rate(a.python, list(map(str, files)), a.tokens, a.repeat)
    print(f"halo-mlir generate (IREE 3.9, the exported module): first token {first * 1e3:.0f} "
          f"ms, decode {rate:.1f} tokens/s")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
