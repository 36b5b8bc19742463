"""`import-params --quantize fp8`: a float checkpoint -> the FP8 parameters of `fp8.py`.

Entries follow `params.names.fp8_param_entries(cfg)` (keys, shapes, dtypes, order): each linear weight
KEY as `KEY:qs` (f8E4M3FNUZ [out, in], `fp8.quantize`) and `KEY:d` (f32 [], amax / 240)
or, with per-channel scales, `KEY:d_rows` (f32 [out], each row's amax / 240);
the activation rscales from `calibrate`; token embedding, norms and lm_head in `dtype`.
Weights stream in row blocks from a `sources.RowsSource` (safetensors or GGUF): the
calibration pass reads each weight once (forward + amax), the write pass once more
(quantize), so memory is bounded by a block, not by a tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from halo_mlir.quantization import fp8
from halo_mlir.errors import HaloError
from halo_mlir.params import irpa
from halo_mlir.params.calibrate import calibrate
from halo_mlir.params.names import fp8_param_entries
from halo_mlir.params.safetensors_import import numpy_dtype
from halo_mlir.sharding_passes.plan import check_divisible, check_moe_parallel

QUANTIZE = ("fp8",)


def check_quantize(quantize: str | None, keep_quantized: bool = False) -> None:
    if quantize is None:
        return
    if quantize not in QUANTIZE:
        raise HaloError(f"unknown --quantize {quantize!r}: choose one of {', '.join(QUANTIZE)}")
    if keep_quantized:
        raise HaloError("--quantize fp8 quantizes from float weights; it cannot keep GGUF "
                        "blocks too: drop --keep-quantized (block weights are dequantized first)")


def preflight(cfg, out: str | Path, tp: int = 1, moe: str = "ffn",
              scales: str = "per-tensor") -> None:
    """The checks that need no weights: TP degree, the scales' scheme for this model (experts
    take per-tensor only), output directory (run before anything slow, or printed, so bad
    input is one line)."""
    check_moe_parallel(cfg, tp, moe)
    if tp > 1:
        check_divisible(cfg, tp, moe)
    fp8_param_entries(cfg, scales)
    out = Path(out)
    if not out.parent.is_dir():
        raise HaloError(f"{out}: directory {out.parent} does not exist")


def import_fp8(source, out: str | Path, ids: np.ndarray, *, dtype: str = "f16", tp: int = 1,
               layout: str = "per-layer", scales: str = "per-tensor", moe: str = "ffn",
               progress: Callable[[int, int, str], None] = lambda *_: None,
               calibration_progress: Callable[[int, int, str], None] = lambda *_: None) -> int:
    """Calibrate on token `ids`, then write every entry of `params.names.fp8_param_entries(source.cfg)`
    to `out` (rank files for tp > 1, stacked entries for layout `stacked`); `scales`: the
    weight scales' scheme (`fp8.SCALES`). Returns the bytes written; nothing is left at
    `out` on error."""
    cfg = source.cfg
    np_dtype = numpy_dtype(dtype)
    fp8.check_scales(scales)
    preflight(cfg, out, tp, moe, scales)
    entries = fp8_param_entries(cfg, scales)
    # The writer first: a bad --layout or output directory fails before the calibration.
    with irpa.writer(out, tp, layout, moe) as writer:
        found = calibrate(source, ids, calibration_progress, scales)
        missing = [k for k, (_, kind) in entries.items() if kind == "f32" and k not in found]
        if missing:
            raise HaloError(f"internal error: calibration gave no scale for {missing[0]}")
        for n, (key, (_, kind)) in enumerate(entries.items()):
            progress(n, len(entries), key)
            if kind == "float":
                writer.add_chunks(key, (rows.astype(np_dtype, copy=False)
                                        for _, _, rows in source.row_blocks(key)))
            elif kind == fp8.FP8:
                weight = key[:-len(":qs")]
                d = found[fp8.weight_keys(weight, scales)[1]]
                if fp8.is_expert(weight):  # [E, out, in]: one expert a chunk, its own scale
                    chunks = (fp8.quantize(source.expert_rows(weight, e), d[e])[None]
                              for e in range(len(d)))
                elif np.ndim(d):  # per-channel: each block of rows with its rows' scales
                    chunks = (fp8.quantize(rows, d[a:b])
                              for a, b, rows in source.row_blocks(weight))
                else:
                    chunks = (fp8.quantize(rows, d) for _, _, rows in source.row_blocks(weight))
                writer.add_chunks(key, chunks)
            else:  # 0-d: 4 bytes; per-channel weight scales [rows]
                writer.add(key, np.array(found[key], np.float32))
        progress(len(entries), len(entries), "")
        writer.commit()
        return writer.nbytes
