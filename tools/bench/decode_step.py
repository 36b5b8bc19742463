#!/usr/bin/env python3
"""Time one CPU decode step (decode_bs4, f16) of the unrolled or the `--layer-loop` program
(fused attention unless `--attention` says otherwise: the loop attends with the fused op).

    python tools/bench/decode_step.py --model toy --layers 8 --form loop --work DIR
    python tools/bench/decode_step.py --gguf SmolLM2.gguf --form unrolled --work DIR

Prints `median_ms=... layers=...`. Random weights for presets; a GGUF's own weights.
Each row's context is 64 tokens over its own pages (the cache holds zeros: the step's
work does not depend on the values).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

BS, CONTEXT, STRIDE = 4, 64, 32


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--gguf")
    ap.add_argument("--form", choices=["unrolled", "loop"], required=True)
    ap.add_argument("--attention", default="fused", choices=["fused", "paged", "decomposed"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--work", required=True)
    args = ap.parse_args()

    import numpy as np

    from halo_mlir import config
    from halo_mlir.api import emit_to_file
    from halo_mlir.toolchain.compile import compile_file
    from halo_mlir.model.decoder import EmitOptions
    from halo_mlir.params import irpa
    from halo_mlir.params.names import param_shapes
    from halo_mlir.inference.runtime import Program

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    loop = args.form == "loop"
    layout = "stacked" if loop else "per-layer"
    params = work / "params.irpa"
    if args.gguf:
        from halo_mlir.params.gguf_file import GgufFile
        from halo_mlir.params.gguf_import import import_gguf

        with GgufFile(args.gguf) as g:
            cfg = g.config()
        import_gguf(args.gguf, params, dtype="f16", layout=layout)
    else:
        cfg = config.preset(args.model).with_layers(args.layers)
        rng = np.random.default_rng(0)
        with irpa.writer(params, 1, layout) as w:
            for key, shape in param_shapes(cfg).items():
                w.add(key, (0.02 * rng.standard_normal(shape)).astype(np.float16))
            w.commit()
    opts = EmitOptions(bs_prefill=(BS,), bs_decode=(BS,), block_seq_stride=STRIDE,
                       dtype="f16", attention=args.attention, layer_loop=loop)
    emit_to_file(cfg, opts, work / "m.mlir")
    compile_file(work / "m.mlir", work / "m.vmfb", target="cpu", echo=lambda *_: None)

    pages_per_row = CONTEXT // STRIDE + 1
    block_ids = np.arange(BS * pages_per_row, dtype=np.int64).reshape(BS, pages_per_row)
    tokens = np.ones((BS, 1), np.int64)
    start = np.full((BS,), CONTEXT, np.int64)
    times = []
    with Program(work / "m.vmfb", [params]) as prog:
        cache = prog.device_array(np.zeros((BS * pages_per_row, cfg.page_elems(opts.block_seq_stride)),
                                           np.float16))
        for step in range(3 + args.steps):
            t = time.perf_counter()
            prog.decode(tokens, start + 1, start, block_ids, [cache])
            if step >= 3:
                times.append((time.perf_counter() - t) * 1e3)
        del cache
    print(f"median_ms={statistics.median(times):.3f} min_ms={min(times):.3f} "
          f"layers={cfg.n_layers}")


if __name__ == "__main__":
    main()
