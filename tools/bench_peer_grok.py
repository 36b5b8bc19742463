#!/usr/bin/env python3
"""sharktank's Grok and halo-mlir's on the same random weights: export time and logits.

sharktank 3.6.0 runs Grok through its paged Llama model (`model_arch="grok"`) and makes
random Grok weights with `sharktank.models.grok.testing.make_random_grok_theta`. This
script, run by halo's python, drives both tools on one toy config (sharktank's toy_grok
shapes: hidden 128, 8 query / 2 kv heads, head_dim 16, 4 experts top 2, expert ffn 512 =
hidden x experts as the generator makes them, vocab 256, RMSNorm eps 0.01, RoPE base
500000; 2 layers, f32):

  1. `st-make` (a child run by sharktank's python): the theta, with one addition: an
     `attn_output_norm` per block (Grok-1 normalizes the attention output; the generator
     leaves the tensor out, and sharktank then skips that norm). Written as a sharktank
     IRPA dataset and as an .npz of the same arrays.
  2. Export, timed (wall, peak RSS): `python -m sharktank.examples.export_paged_llm_v1`
     on the IRPA, and `halo-mlir emit --gguf` on the same weights as a GGUF; both bs 4,
     page 16 tokens, f32.
  3. Logits of a prefill of two right-padded rows (32 and 19 tokens): sharktank's torch
     model run eagerly (`st-prefill`), and halo-mlir's module compiled for this CPU. The
     GGUF halo-mlir imports holds sharktank's arrays under their own names, with three
     conversions that change no number: the rows of attn_q/attn_k reordered within each
     head from sharktank's interleaved RoPE pairs (0,1),(2,3),... to the halves that
     halo-mlir (and Grok-1's model.py) rotate together; `output_norm.weight` [1, D] ->
     [D]; and sharktank's multipliers as the scale keys (embeddings x sqrt(D), logits /
     sqrt(3), attention 1/sqrt(head_dim), soft cap 30: sharktank's values for grok).
     sharktank's expert activation is `torch.nn.functional.gelu`, the erf form; Grok-1's
     `jax.nn.gelu` (and halo-mlir) is the tanh form. sharktank is therefore run twice:
     as shipped, and with its GELU set to the tanh form; the second is the comparison.

Set up sharktank's virtualenv as tools/bench_peer.py's docstring says, then:

    python tools/bench_peer_grok.py --sharktank-python venv-sharktank/bin/python \\
        --work-dir out --json grok_peer.json

It prints a table and writes --json. Exit status 1 when the tanh-GELU comparison exceeds
--rtol (max |difference| / max |sharktank logit|).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HP = dict(hidden=128, heads=8, kv_heads=2, head_dim=16, experts=4, top_k=2, vocab=256,
          rms_eps=0.01, rope_theta=500000.0, stride=16, pages=8, softcap=30.0)
LENS = [32, 19]  # prefill rows (right-padded to 32)
SEED = 12345


# ---------------------------------------------------------------- sharktank children

def _st_config(layers: int):
    import torch
    from sharktank.layers.configs import LlamaHParams, LlamaModelConfig

    hp = LlamaHParams(
        context_length=HP["stride"] * HP["pages"], embedding_length=HP["hidden"],
        block_count=layers, feed_forward_length=23, rope_dimension_count=HP["head_dim"],
        rope_freq_base=HP["rope_theta"], attention_head_count=HP["heads"],
        attn_head_dim=HP["head_dim"], attention_layer_norm_rms_epsilon=HP["rms_eps"],
        attention_head_count_kv=HP["kv_heads"], expert_count=HP["experts"],
        expert_used_count=HP["top_k"], model_arch="grok", attention_softcap=HP["softcap"],
        n_dense_layers=0)
    return LlamaModelConfig(hp=hp, block_seq_stride=HP["stride"],
                            activation_dtype=torch.float32, attention_dtype=torch.float32,
                            attention_kernel="decomposed")


def st_make(out: Path, layers: int) -> None:
    """Random Grok theta (sharktank's generator) -> out/theta.irpa and out/theta.npz."""
    import numpy as np
    import torch
    from sharktank.models.grok.testing import make_random_grok_theta
    from sharktank.types import Dataset, DefaultPrimitiveTensor, Theta
    from sharktank.utils.random import make_rand_torch

    config = _st_config(layers)
    torch.manual_seed(SEED)
    theta = make_random_grok_theta(config=config, vocab_size=HP["vocab"], dtype=torch.float32)
    tree = theta.tree
    for i in range(layers):
        tree["blk"][str(i)]["attn_output_norm"] = {"weight": DefaultPrimitiveTensor(
            name=f"blk.{i}.attn_output_norm.weight", data=make_rand_torch((HP["hidden"],)))}
    theta = Theta(tree)
    Dataset(config.hp.to_gguf_props(), theta).save(str(out / "theta.irpa"))
    np.savez(out / "theta.npz", **{k: v.as_torch().numpy()
                                   for k, v in theta.flatten().items()})


def st_prefill(out: Path, layers: int, gelu: str) -> None:
    """sharktank's PagedLlmModelV1 (eager torch, f32) prefill of out/tokens.npy ->
    out/st_logits_{gelu}.npy. gelu: `erf` (as shipped) or `tanh`."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    if gelu == "tanh":  # the MoE block picks F.gelu when it is built: swap it first
        exact = F.gelu
        F.gelu = lambda x, approximate="tanh": exact(x, approximate=approximate)
    from sharktank.models.llm import PagedLlmModelV1
    from sharktank.types import Dataset

    ds = Dataset.load(str(out / "theta.irpa"))
    config = _st_config(layers)
    model = PagedLlmModelV1(ds.root_theta, config)
    tokens = torch.from_numpy(np.load(out / "tokens.npy"))
    lens = torch.tensor(LENS)
    mask = model.attention_mask(model.input_mask(lens, tokens.shape[1]))
    cache = model.cache.allocate(HP["pages"])
    pages = tokens.shape[1] // HP["stride"]
    block_ids = torch.arange(1, 1 + 2 * pages).reshape(2, pages)
    with torch.no_grad():
        logits = model.prefill(tokens, attention_mask=[mask], seq_block_ids=[block_ids],
                               cache_state=cache)
    np.save(out / f"st_logits_{gelu}.npy", logits.numpy())


def st_export(argv: list[str]) -> None:
    """`python -m sharktank.examples.export_paged_llm_v1 ARGV` with one fix: sharktank
    3.6.0's `LlamaHParams.from_gguf_props` reads `leading_dense_block_count` only for
    deepseek2, so a grok dataset loaded from a file gets n_dense_layers=None and every
    block is built as a dense FFN, which fails ("Sub-theta ['ffn_gate'] not found").
    Setting it to 0 for grok (what its toy_grok config says) builds the MoE blocks."""
    import runpy

    from sharktank.layers import configs

    load = configs.LlamaHParams.from_gguf_props

    def from_gguf_props(p):
        hp = load(p)
        if hp.model_arch == "grok" and hp.n_dense_layers is None:
            hp.n_dense_layers = 0
        return hp
    configs.LlamaHParams.from_gguf_props = staticmethod(from_gguf_props)
    sys.argv = ["export_paged_llm_v1", *argv]
    runpy.run_module("sharktank.examples.export_paged_llm_v1", run_name="__main__")


# ---------------------------------------------------------------- halo-mlir side

def _interleaved_to_halves(w, heads: int, head_dim: int):
    """Rows of a Q/K projection, per head, from RoPE pairs (2i, 2i+1) to (i, i + d/2)."""
    import numpy as np

    order = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    return w.reshape(heads, head_dim, -1)[:, order].reshape(w.shape)


def write_gguf(npz: Path, path: Path, layers: int) -> None:
    """sharktank's arrays as a GGUF in llama.cpp's grok naming with sharktank's multipliers."""
    import math

    import gguf
    import numpy as np

    w = dict(np.load(npz))
    for i in range(layers):
        for name, heads in (("attn_q", HP["heads"]), ("attn_k", HP["kv_heads"])):
            key = f"blk.{i}.{name}.weight"
            w[key] = _interleaved_to_halves(w[key], heads, HP["head_dim"])
    w["output_norm.weight"] = w["output_norm.weight"].reshape(-1)
    g = gguf.GGUFWriter(str(path), "grok")
    g.add_name("sharktank-toy-grok")
    g.add_block_count(layers)
    g.add_context_length(HP["stride"] * HP["pages"])
    g.add_embedding_length(HP["hidden"])
    g.add_feed_forward_length(w["blk.0.ffn_gate_exps.weight"].shape[1])
    g.add_head_count(HP["heads"])
    g.add_head_count_kv(HP["kv_heads"])
    g.add_rope_dimension_count(HP["head_dim"])
    g.add_rope_freq_base(HP["rope_theta"])
    g.add_layer_norm_rms_eps(HP["rms_eps"])
    g.add_expert_count(HP["experts"])
    g.add_expert_used_count(HP["top_k"])
    g.add_vocab_size(HP["vocab"])
    g.add_float32("grok.attention.output_scale", 1 / math.sqrt(HP["head_dim"]))
    g.add_float32("grok.attn_logit_softcapping", HP["softcap"])
    g.add_float32("grok.embedding_scale", math.sqrt(HP["hidden"]))
    g.add_float32("grok.logit_scale", 1 / math.sqrt(3.0))
    for name, a in w.items():
        g.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()


def halo_prefill(d: Path, layers: int) -> "np.ndarray":
    """Import, emit (bs 2, f32), compile for this CPU, prefill d/tokens.npy."""
    import numpy as np

    from halo_mlir.inference.runtime import Program

    def halo(*args):
        subprocess.run([sys.executable, "-m", "halo_mlir", *map(str, args)], check=True)
    gg, irpa, mlir, vmfb = d / "toy.gguf", d / "toy.irpa", d / "m2.mlir", d / "m2.vmfb"
    halo("import-params", "--gguf", gg, "--dtype", "f32", "-o", irpa)
    halo("emit", "--gguf", gg, "--dtype", "f32", "--bs-prefill", 2, "--bs-decode", 2,
         "--block-seq-stride", HP["stride"], "-o", mlir)
    halo("compile", mlir, "--target", "cpu", "-o", vmfb)
    tokens = np.load(d / "tokens.npy")
    pages = tokens.shape[1] // HP["stride"]
    page_elems = layers * 2 * HP["kv_heads"] * HP["stride"] * HP["head_dim"]
    with Program(vmfb, [irpa]) as prog:
        caches = [prog.device_array(np.zeros((HP["pages"], page_elems), np.float32))]
        out = prog.prefill(tokens, np.array(LENS, np.int64),
                           np.arange(1, 1 + 2 * pages, dtype=np.int64).reshape(2, pages),
                           caches)
        del caches
    return out


# ---------------------------------------------------------------- driver

def compare(a, ref) -> dict:
    """Over the unpadded positions: max |a - ref|, and that over max |ref|."""
    import numpy as np

    diff = max(float(np.abs(a[b, :n] - ref[b, :n]).max()) for b, n in enumerate(LENS))
    scale = max(float(np.abs(ref[b, :n]).max()) for b, n in enumerate(LENS))
    return {"max_abs": diff, "max_rel": diff / scale, "max_ref": scale}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["st-export"]:  # (internal, sharktank's python) its own arguments follow
        st_export(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    for name in ("st-make", "st-prefill"):
        c = sub.add_parser(name, help="(internal, sharktank's python)")
        c.add_argument("--dir", type=Path, required=True)
        c.add_argument("--layers", type=int, required=True)
        c.add_argument("--gelu", choices=["erf", "tanh"], default="erf")
    p.add_argument("--sharktank-python", default=os.environ.get("HALO_SHARKTANK_PYTHON"),
                   help="python of the sharktank 3.6.0 virtualenv [$HALO_SHARKTANK_PYTHON]")
    p.add_argument("--halo-mlir", default=None,
                   help="halo-mlir executable for the timed emit [python -m halo_mlir]")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--work-dir", type=Path, default=Path("peer_grok_out"))
    p.add_argument("--no-export", action="store_true", help="skip the timed exports")
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)

    if args.cmd == "st-make":
        st_make(args.dir, args.layers)
        return 0
    if args.cmd == "st-prefill":
        st_prefill(args.dir, args.layers, args.gelu)
        return 0
    if not args.sharktank_python:
        p.error("--sharktank-python (or $HALO_SHARKTANK_PYTHON) is required")

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_peer import run_measured

    d = args.work_dir.resolve()
    d.mkdir(parents=True, exist_ok=True)
    st = [args.sharktank_python, str(Path(__file__).resolve())]
    L = str(args.layers)
    res: dict = {"config": {**HP, "layers": args.layers, "prefill_rows": LENS}}

    t0 = time.monotonic()
    subprocess.run(st + ["st-make", "--dir", d, "--layers", L], check=True)
    write_gguf(d / "theta.npz", d / "toy.gguf", args.layers)
    res["prep_s"] = round(time.monotonic() - t0, 2)

    if not args.no_export:
        halo_cmd = [args.halo_mlir] if args.halo_mlir else [sys.executable, "-m", "halo_mlir"]
        common = ["--bs-prefill", "4", "--bs-decode", "4", "--block-seq-stride",
                  str(HP["stride"])]
        st_args = ["--irpa-file", d / "theta.irpa", "--output-mlir", d / "st_export.mlir",
                   "--output-config", d / "st_export.json", "--activation-dtype", "float32",
                   "--attention-dtype", "float32", *common]
        ex = {"sharktank (as shipped)": run_measured(
                  [args.sharktank_python, "-m", "sharktank.examples.export_paged_llm_v1",
                   *st_args], d / "st_export_shipped.log", 1800),
              "sharktank": run_measured([*st, "st-export", *st_args], d / "st_export.log",
                                        1800),
              "halo-mlir": run_measured(
                  [*halo_cmd, "emit", "--gguf", d / "toy.gguf", "--dtype", "f32", *common,
                   "-o", d / "halo_emit.mlir"], d / "halo_emit.log", 1800)}
        res["export"] = {k: {"ok": m.ok, "wall_s": m.wall_s, "rss_mb": m.rss_mb,
                             "error": m.error,
                             "mlir_mb": round((d / ("halo_emit.mlir" if k == "halo-mlir"
                                                    else "st_export.mlir")).stat().st_size
                                              / 1e6, 2) if m.ok else None}
                         for k, m in ex.items()}

    rng = np.random.default_rng(1)
    tokens = rng.integers(0, HP["vocab"], size=(2, max(LENS))).astype(np.int64)
    tokens[1, LENS[1]:] = 0
    np.save(d / "tokens.npy", tokens)
    for gelu in ("erf", "tanh"):
        subprocess.run(st + ["st-prefill", "--dir", d, "--layers", L, "--gelu", gelu],
                       check=True)
    ours = halo_prefill(d, args.layers)
    np.save(d / "halo_logits.npy", ours)
    ref = {g: np.load(d / f"st_logits_{g}.npy") for g in ("erf", "tanh")}
    res["logits"] = {"halo_vs_sharktank_tanh_gelu": compare(ours, ref["tanh"]),
                     "halo_vs_sharktank_as_shipped": compare(ours, ref["erf"]),
                     "sharktank_erf_vs_tanh": compare(ref["erf"], ref["tanh"])}
    ok = res["logits"]["halo_vs_sharktank_tanh_gelu"]["max_rel"] <= args.rtol
    res["ok"] = ok

    if "export" in res:
        print("| tool | export/emit wall s | peak RSS MB | MLIR MB |\n|---|---|---|---|")
        for k, e in res["export"].items():
            print(f"| {k} | {e['wall_s'] if e['ok'] else 'FAILED: ' + str(e['error'])[:90]} | "
                  f"{e['rss_mb']} | {e['mlir_mb']} |")
    for k, v in res["logits"].items():
        print(f"{k}: max |diff| {v['max_abs']:.3g} ({v['max_rel']:.3g} of max |logit| "
              f"{v['max_ref']:.3g})")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
