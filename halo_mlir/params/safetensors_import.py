"""HF safetensors checkpoint (one file or a sharded index) -> IRPA with docs/ABI.md keys."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable

import numpy as np

from halo_mlir.config import LlamaConfig
from halo_mlir.errors import HaloError, lookup
from halo_mlir.params import irpa
from halo_mlir.params.names import FUSED_EXPERTS_MARK, hf_sources, param_shapes, split_source
from halo_mlir.params.safetensors_file import SafetensorsFile
from halo_mlir.sharding_passes.plan import check_divisible, check_moe_parallel

NUMPY_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
_CHUNK_BYTES = 64 << 20


def numpy_dtype(dtype: str) -> np.dtype:
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    return np.dtype(lookup(NUMPY_DTYPES, dtype, "parameter dtype"))


def checkpoint_files(path: Path) -> dict[str, Path] | Path:
    """The index's {tensor name: file} for a sharded checkpoint, else the single file."""
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        path = index if index.exists() else path / "model.safetensors"
    if not path.exists():
        raise HaloError(f"{path}: no such checkpoint; pass a .safetensors file, an "
                        "index.json or a directory holding one")
    if not path.name.endswith(".json"):
        return path
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise HaloError(f"{path}: not a safetensors index ({e})") from None
    return {name: path.parent / file for name, file in weight_map.items()}


def _row_blocks(f: SafetensorsFile, name: str, dtype: np.dtype):
    """The tensor as converted row blocks of at most ~64 MB each."""
    shape = f.shape(name)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * 4
    step = max(1, _CHUNK_BYTES // max(row_bytes, 1))
    for r in range(0, shape[0], step):
        yield f.rows(name, r, min(r + step, shape[0])).astype(dtype, copy=False)


def _half_rows(f: SafetensorsFile, name: str, half: int, dtype: np.dtype):
    """Half `half` of dim 1 of a stacked [E, 2F, ...] tensor, one expert at a time."""
    experts, rows = f.shape(name)[:2]
    part = rows // 2
    for e in range(experts):
        yield f.rows(name, e, e + 1)[:, half * part:(half + 1) * part].astype(dtype)


def open_checkpoint(path: str | Path, cfg: LlamaConfig, stack: contextlib.ExitStack,
                    file_class: type = SafetensorsFile
                    ) -> tuple[Callable[..., SafetensorsFile | None], bool]:
    """(`file_of(hf name)`, fused) for the checkpoint at `path` (files opened on first use,
    as `file_class`, closed with `stack`), after checking every parameter of `cfg` is there
    with its shape. `file_of(name, missing_ok=True)` is None for a name the index does not
    list (a single file: its file, whether it holds the name or not).
    `fused`: a Mixtral checkpoint in transformers' in-memory layout (experts stacked, gate
    and up in one `gate_up_proj`, names.MIXTRAL_FUSED_HF_NAMES) instead of `save_pretrained`'s
    one tensor per expert."""
    located = checkpoint_files(Path(path))
    opened: dict[Path, SafetensorsFile] = {}

    def file_of(name: str, missing_ok: bool = False) -> SafetensorsFile | None:
        file = located.get(name) if isinstance(located, dict) else located
        if file is None:
            if missing_ok:
                return None
            raise HaloError(f"{path}: the index does not list {name}")
        if file not in opened:
            opened[file] = stack.enter_context(file_class(file))
        return opened[file]

    fused = False
    if cfg.is_moe:
        fused = (FUSED_EXPERTS_MARK in located if isinstance(located, dict)
                 else FUSED_EXPERTS_MARK in file_of(FUSED_EXPERTS_MARK).tensors)
    for key, shape in param_shapes(cfg).items():  # check everything before writing anything
        names = hf_sources(key, cfg, fused)
        if len(names) > 1:  # one tensor per expert, stacked
            shape = shape[1:]
        for source in names:
            name, half = split_source(source)
            f = file_of(name)
            if name not in f.tensors:
                raise HaloError(f"{f.path}: checkpoint lacks tensor {name} (ABI key {key}); "
                                "is the config right for this checkpoint?")
            want = shape if half is None else (shape[0], 2 * shape[1], *shape[2:])
            if f.shape(name) != want:
                raise HaloError(f"{f.path}: {name} has shape {list(f.shape(name))}, the "
                                f"config expects {list(want)}")
            f.dtype(name)
    return file_of, fused


def import_safetensors(path: str | Path, cfg: LlamaConfig, out: str | Path, *, dtype: str,
                       progress: Callable[[int, int, str], None] = lambda *_: None,
                       tp: int = 1, layout: str = "per-layer", moe: str = "ffn") -> int:
    """Write every parameter of `cfg` from the checkpoint at `path` into `out`, converted
    to `dtype`, in row blocks: memory stays bounded whatever the checkpoint's size.
    Returns the bytes written. `moe`: how --tp splits the experts (plan.MOE_PARALLEL)."""
    np_dtype = numpy_dtype(dtype)
    check_moe_parallel(cfg, tp, moe)
    if tp > 1:
        check_divisible(cfg, tp, moe)
    shapes = param_shapes(cfg)
    with contextlib.ExitStack() as stack:
        file_of, fused = open_checkpoint(path, cfg, stack)
        writer = stack.enter_context(irpa.writer(out, tp, layout, moe))
        for n, key in enumerate(shapes):
            progress(n, len(shapes), key)
            names = hf_sources(key, cfg, fused)
            if len(names) == 1:
                name, half = split_source(names[0])
                writer.add_chunks(key, _row_blocks(file_of(name), name, np_dtype) if half is None
                                  else _half_rows(file_of(name), name, half, np_dtype))
            else:  # experts stacked in order, one [1, ...] piece each: [E, ...]
                writer.add_chunks(key, (np.concatenate(list(_row_blocks(
                    file_of(name), name, np_dtype)))[None] for name in names))
        progress(len(shapes), len(shapes), "")
        writer.commit()
        return writer.nbytes
