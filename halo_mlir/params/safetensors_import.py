"""HF safetensors checkpoint (one file or a sharded index) -> IRPA with ABI.md keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from halo_mlir.config import LlamaConfig
from halo_mlir.errors import HaloError
from halo_mlir.params.irpa import IrpaWriter
from halo_mlir.params.names import hf_name, param_shapes

NUMPY_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def numpy_dtype(dtype: str) -> np.dtype:
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    try:
        return np.dtype(NUMPY_DTYPES[dtype])
    except KeyError:
        raise HaloError(f"unknown parameter dtype {dtype!r}: choose one of "
                        f"{', '.join(NUMPY_DTYPES)}") from None


def checkpoint_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    from safetensors import safe_open

    if path.is_dir():
        index = path / "model.safetensors.index.json"
        path = index if index.exists() else path / "model.safetensors"
    if not path.exists():
        raise HaloError(f"{path}: no such checkpoint; pass a .safetensors file, an "
                        "index.json or a directory holding one")
    if path.name.endswith(".json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise HaloError(f"{path}: not a safetensors index ({e})") from None
        return {name: path.parent / file for name, file in weight_map.items()}
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {name: path for name in f.keys()}
    except Exception as e:
        raise HaloError(f"{path}: unreadable safetensors file ({e}); is it truncated?") from None


def _check_shapes(files: dict[str, Path], shapes: dict, path) -> None:
    """Every tensor present with the config's shape, read from headers before any data."""
    from safetensors import safe_open

    by_file: dict[Path, list[tuple[str, tuple]]] = {}
    for key, shape in shapes.items():
        name = hf_name(key)
        if name not in files:
            raise HaloError(f"{path}: checkpoint lacks tensor {name} (ABI key {key}); "
                            "is the config right for this checkpoint?")
        by_file.setdefault(files[name], []).append((name, shape))
    for file, wanted in by_file.items():
        try:
            with safe_open(str(file), framework="numpy") as f:
                found = {name: tuple(f.get_slice(name).get_shape()) for name, _ in wanted}
        except Exception as e:
            raise HaloError(f"{file}: unreadable safetensors file ({e}); is it truncated?") \
                from None
        for name, shape in wanted:
            if found[name] != shape:
                raise HaloError(f"{file}: {name} has shape {list(found[name])}, the config "
                                f"expects {list(shape)}")


def import_safetensors(path: str | Path, cfg: LlamaConfig, out: str | Path, *, dtype: str,
                       progress: Callable[[int, int, str], None] = lambda *_: None) -> int:
    """Write every parameter of `cfg` from the checkpoint at `path` into `out`, converted
    to `dtype`, one tensor at a time. Returns the bytes written."""
    from safetensors import safe_open

    np_dtype = numpy_dtype(dtype)
    files = checkpoint_files(Path(path))
    shapes = param_shapes(cfg)
    _check_shapes(files, shapes, path)
    with IrpaWriter(out) as writer:
        for n, (key, shape) in enumerate(shapes.items()):
            name = hf_name(key)
            progress(n, len(shapes), key)
            try:
                with safe_open(str(files[name]), framework="numpy") as f:
                    array = f.get_tensor(name)
            except Exception as e:
                raise HaloError(f"{files[name]}: cannot read {name} ({e}); is the file "
                                "truncated?") from None
            writer.add(key, array.astype(np_dtype, copy=False))
        progress(len(shapes), len(shapes), "")
        writer.commit()
        return writer.nbytes
