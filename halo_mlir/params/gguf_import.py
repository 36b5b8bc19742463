"""GGUF (llama.cpp) -> IRPA with docs/ABI.md keys: dequantized, or kept in native block formats."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from halo_mlir.config import LlamaConfig
from halo_mlir.errors import HaloError
from halo_mlir.params.gguf_file import GgufFile
from halo_mlir.params import irpa
from halo_mlir.params.names import param_shapes
from halo_mlir.params.safetensors_import import numpy_dtype
from halo_mlir.quantization.blocks import BY_GGML
from halo_mlir.sharding_passes.plan import check_divisible, check_moe_parallel, check_quantized_split

_CHUNK_ROWS_BYTES = 64 << 20


_FLOAT = ("F32", "F16", "BF16", "F64")


def _matrix(key: str, shape: tuple[int, ...]) -> bool:
    """A matrix that may stay quantized: a linear's weight [out, in], or a stack of experts'
    [experts, out, in]. The MoE router (`ffn_gate_inp`) is always read in floats."""
    return len(shape) == 2 or (len(shape) == 3 and key.endswith("_exps.weight"))


def weight_formats(g: GgufFile, cfg: LlamaConfig, keep_quantized: bool, *,
                   layer_loop: bool = False) -> dict[str, str]:
    """ABI key -> quantized format for the matrices that stay quantized: those stored in a
    format with a native kernel (Q8_0, Q4_1, Q4_K, Q6_K) whose input dimension is a whole
    number of its blocks, stacked experts (`ffn_*_exps`) included. Everything else, and the
    MoE router, is dequantized. `layer_loop` (a stacked layout, one loop body for every
    layer): a block weight kind whose layers are not all in one format (llama.cpp's Q4_K_M:
    some layers' attn_v / ffn_down in Q6_K, the others in Q4_K) is dequantized in every layer
    (see mixed_kinds)."""
    if not keep_quantized:
        return {}
    formats = {key: BY_GGML[g.qtype(key)].name for key, shape in param_shapes(cfg).items()
               if _matrix(key, shape) and ".ffn_gate_inp." not in key
               and g.qtype(key) in BY_GGML and shape[-1] % BY_GGML[g.qtype(key)].block == 0}
    if layer_loop:
        mixed = mixed_kinds(g, cfg, formats)
        formats = {k: f for k, f in formats.items() if _kind(k) not in mixed}
    return formats


def _kind(key: str) -> str | None:
    """`blk.3.ffn_down.weight` -> `ffn_down.weight`; None for a key outside the blocks."""
    return key.split(".", 2)[2] if key.startswith("blk.") else None


def mixed_kinds(g: GgufFile, cfg: LlamaConfig,
                formats: dict[str, str]) -> dict[str, dict[str, int]]:
    """Block weight kinds whose layers do not all run in one form, from the per-layer
    `formats` (weight_formats without layer_loop): {kind: {form: layers}}, a form being a
    native format (`Q4_K`) or a dequantized one (`Q5_0 dequantized`)."""
    forms: dict[str, dict[str, int]] = {}
    for key, shape in param_shapes(cfg).items():
        kind = _kind(key)
        if kind is None or len(shape) != 2:
            continue
        form = formats[key].upper() if key in formats else (
            f"{g.qtype(key)} dequantized" if g.qtype(key) not in _FLOAT else g.qtype(key))
        counts = forms.setdefault(kind, {})
        counts[form] = counts.get(form, 0) + 1
    return {kind: counts for kind, counts in forms.items() if len(counts) > 1
            and any(not form.endswith("dequantized") and form not in _FLOAT for form in counts)}


def layer_loop_note(g: GgufFile, cfg: LlamaConfig, dtype: str) -> str | None:
    """With --keep-quantized --layer-loop: one line naming the block weight kinds that are
    dequantized (to `dtype`) because their layers are in different formats; None if none."""
    mixed = mixed_kinds(g, cfg, weight_formats(g, cfg, True))
    if not mixed:
        return None
    shown = "; ".join(f"{kind} ({', '.join(f'{form} in {n}' for form, n in counts.items())})"
                      for kind, counts in mixed.items())
    return (f"note: --layer-loop: {len(mixed)} weight kind(s) mix formats across layers and "
            f"are dequantized to {dtype} in every layer: {shown} (one loop body runs one "
            "format a kind; without --layer-loop each layer keeps its own format)")


def dequantized_note(g: GgufFile, cfg: LlamaConfig) -> str | None:
    """With --keep-quantized: one line naming the quantized matrices that are dequantized
    anyway (a format without a native kernel, e.g. the Q5_0/Q8_1 llama.cpp falls back to
    where a row is not a whole number of K-quant super-blocks); None when there are none.
    (Kinds dequantized only because --layer-loop needs one format a kind are named by
    layer_loop_note.)"""
    formats = weight_formats(g, cfg, True)
    left = [f"{key} ({g.qtype(key)})" for key, shape in param_shapes(cfg).items()
            if _matrix(key, shape) and ".ffn_gate_inp." not in key and key not in formats
            and g.qtype(key) not in _FLOAT]
    if not left:
        return None
    shown = ", ".join(left[:4]) + (f" and {len(left) - 4} more" if len(left) > 4 else "")
    return (f"note: --keep-quantized: {len(left)} quantized weight(s) have no native kernel "
            f"and are dequantized: {shown} (native: {', '.join(BY_GGML)})")


def unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores Q/K rows of each head interleaved for its RoPE; back to HF order
    (halves rotated together). Works on raw block rows too: only rows move."""
    n = rows.shape[0]
    return rows.reshape(heads, n // heads // 2, 2, -1).swapaxes(1, 2).reshape(rows.shape)


def _row_blocks(rows: int, cols: int, read):
    """`read(start, stop)` over row blocks of at most ~64 MB once dequantized to f32."""
    step = max(1, _CHUNK_ROWS_BYTES // (cols * 4))
    for r in range(0, rows, step):
        yield read(r, min(r + step, rows))


def _add_expert_fields(writer, g: GgufFile, key: str, shape: tuple[int, ...]) -> None:
    """A stacked expert weight [E, N, K] kept quantized: each field `KEY:FIELD`
    [E, N, K/block, ...], written one expert at a time (each expert's raw blocks are read
    once per field, so memory holds one expert)."""
    fmt = BY_GGML[g.qtype(key)]
    e, n, k = shape
    for field in fmt.fields:
        writer.add_chunks(f"{key}:{field}", (
            fmt.split(g.read_rows(key, i * n, (i + 1) * n), n, k)[field][None]
            for i in range(e)))


def check_tensors(g: GgufFile, cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    shapes = param_shapes(cfg)
    for key, shape in shapes.items():
        if not g.has(key):
            raise HaloError(f"{g.path}: tensor {key} is missing; is this a complete llama GGUF?")
        if g.shape(key) != shape:
            raise HaloError(f"{g.path}: tensor {key} has shape {list(g.shape(key))}, the "
                            f"metadata implies {list(shape)}")
    return shapes


def import_gguf(path: str | Path, out: str | Path, *, dtype: str, keep_quantized: bool = False,
                progress: Callable[[int, int, str], None] = lambda *_: None,
                tp: int = 1, layout: str = "per-layer", moe: str = "ffn",
                note: Callable[[str], None] = lambda _: None) -> int:
    """Write every parameter of the GGUF model to `out`. Returns the bytes written;
    `note` gets the lines of dequantized_note and layer_loop_note, if any."""
    np_dtype = numpy_dtype(dtype)
    with GgufFile(path) as g:
        cfg = g.config()
        check_moe_parallel(cfg, tp, moe)
        if tp > 1:
            check_divisible(cfg, tp, moe)
        shapes = check_tensors(g, cfg)
        formats = weight_formats(g, cfg, keep_quantized, layer_loop=layout == "stacked")
        check_quantized_split(formats, shapes, tp)
        # llama.cpp permutes a llama GGUF's Q/K rows for its RoPE; a grok GGUF keeps them
        # as published (NEOX-style rotation: the halves rotate together, as halo_mlir does).
        heads = {} if cfg.family == "grok" else {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads}
        for key in shapes:  # fail on an undecodable format before writing anything
            if key not in formats:
                g.rows_f32(key, 0, 1)
        if keep_quantized:
            for line in (dequantized_note(g, cfg),
                         layout == "stacked" and layer_loop_note(g, cfg, dtype)):
                if line:
                    note(line)
        with irpa.writer(out, tp, layout, moe) as writer:
            for n, (key, shape) in enumerate(shapes.items()):
                progress(n, len(shapes), key)
                rows = shape[0] if len(shape) > 1 else 1
                permute = heads.get(key.split(".")[-2]) if key.startswith("blk.") else None
                fmt = formats.get(key)
                if fmt is not None and len(shape) == 3:  # experts: one at a time, per field
                    _add_expert_fields(writer, g, key, shape)
                elif fmt is not None:
                    raw = g.read_rows(key, 0, rows)
                    raw = unpermute(raw, permute) if permute else raw
                    for field, array in BY_GGML[g.qtype(key)].split(raw, *shape).items():
                        writer.add(f"{key}:{field}", array)
                elif permute:
                    writer.add(key, unpermute(g.rows_f32(key, 0, rows), permute).astype(np_dtype))
                elif len(shape) == 3:  # stacked experts [E, rows, cols]: one expert a chunk
                    per = shape[1]
                    writer.add_chunks(key, (g.rows_f32(key, e * per, (e + 1) * per).astype(
                        np_dtype).reshape(1, *shape[1:]) for e in range(shape[0])))
                else:
                    blocks = _row_blocks(rows, shape[-1], lambda a, b: g.rows_f32(key, a, b))
                    writer.add_chunks(key, (blk.astype(np_dtype) for blk in blocks))
            progress(len(shapes), len(shapes), "")
            writer.commit()
            return writer.nbytes
