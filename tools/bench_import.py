#!/usr/bin/env python3
"""Import benchmark: a synthetic multi-GB bf16 safetensors checkpoint -> f16 IRPA.

    python tools/bench_import.py --layers 4     # 8B shapes, 4 layers: ~3.8 GB
    python tools/bench_import.py --quick        # toy shapes

Prints wall time, peak RSS of the import process and the largest tensor's size, to show
that memory is bounded by the largest tensor rather than the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_checkpoint(path: Path, shapes: dict[str, tuple], seed: int = 0) -> int:
    """A bf16 safetensors file written tensor by tensor (the format: u64 header length,
    JSON header, raw data)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for shape in shapes.values():
            rows = shape[0]
            step = max(1, (64 << 20) // (2 * int(np.prod(shape[1:]))))
            for r in range(0, rows, step):  # 64 MB chunks: the writer stays small too
                chunk = rng.standard_normal((min(step, rows - r), *shape[1:]), np.float32)
                f.write((chunk.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    return offset


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()

    from halo_mlir.config import from_hf_dict, preset
    from halo_mlir.params.names import hf_name, param_shapes

    base = preset("toy" if args.quick else "8b").with_layers(2 if args.quick else args.layers)
    hf = {"hidden_size": base.hidden_size, "num_hidden_layers": base.n_layers,
          "num_attention_heads": base.n_heads, "num_key_value_heads": base.n_kv_heads,
          "intermediate_size": base.ffn_dim, "vocab_size": base.vocab_size,
          "rope_theta": base.rope_theta, "rms_norm_eps": base.rms_eps}
    cfg = from_hf_dict(hf)
    shapes = {hf_name(k): s for k, s in param_shapes(cfg).items()}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        d = Path(tmp)
        (d / "config.json").write_text(json.dumps(hf))
        total = write_checkpoint(d / "model.safetensors", shapes)
        largest = max(int(np.prod(s)) * 2 for s in shapes.values())
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "halo_mlir", "import-params",
                                 "--safetensors", str(d), "--dtype", "f16",
                                 "-o", str(d / "out.irpa")], stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        assert os.waitstatus_to_exitcode(status) == 0, "import failed"
        print("| checkpoint | size (GB) | largest tensor (GB) | import wall (s) | peak RSS (MB) |")
        print("|---|---|---|---|---|")
        print(f"| {'toy' if args.quick else '8b'} x{cfg.n_layers} layers, bf16 -> f16 | "
              f"{total / 1e9:.2f} | {largest / 1e9:.2f} | {wall:.1f} | {usage.ru_maxrss / 1024:.0f} |")


if __name__ == "__main__":
    main()
