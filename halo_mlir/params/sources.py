"""f32 row sources: one interface over the safetensors and GGUF readers.

A source has the model's `cfg` and gives any parameter (ABI key) as f32 rows in HF order,
read in row blocks (`rows`, `row_blocks`), so the FP8 importer and the calibration run the
same way on either checkpoint and never hold a whole large tensor. Opening a source checks
that every parameter of `cfg` is there with its shape (and, for GGUF, decodable).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np

from halo_mlir.config import LlamaConfig
from halo_mlir.errors import HaloError
from halo_mlir.params.names import hf_sources, param_shapes

# Row blocks hold at most this many bytes once converted to f32.
BLOCK_BYTES = 64 << 20


class RowsSource:
    """Subclasses set `cfg`, `path` and implement `rows` and `tokenizer`."""

    cfg: LlamaConfig
    path: Path

    def shape(self, key: str) -> tuple[int, ...]:
        return param_shapes(self.cfg)[key]

    def rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a 2-D parameter, f32 [stop - start, cols]; a 1-D one
        whole for (0, len)."""
        raise NotImplementedError

    def row_blocks(self, key: str) -> Iterator[tuple[int, int, np.ndarray]]:
        """(start, stop, f32 rows) over the parameter in blocks of at most BLOCK_BYTES;
        a 1-D parameter is one block."""
        shape = self.shape(key)
        if len(shape) == 1:
            yield 0, shape[0], self.rows(key, 0, shape[0]).reshape(shape)
            return
        step = max(1, BLOCK_BYTES // (shape[1] * 4))
        for start in range(0, shape[0], step):
            stop = min(start + step, shape[0])
            yield start, stop, self.rows(key, start, stop)

    def expert_rows(self, key: str, e: int) -> np.ndarray:
        """Expert `e` of a stacked expert parameter [E, rows, cols]: f32 [rows, cols]."""
        raise NotImplementedError

    def tokenizer(self):
        """The model's own tokenizer, or None (with `tokenizer_note` saying why)."""
        return None

    tokenizer_note = "no tokenizer"

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


class SafetensorsSource(RowsSource):
    """An HF checkpoint (one file, a sharded index, or their directory) with `cfg`.
    `tokenizer()` is a tokenizer.json beside the checkpoint or beside `config_path`."""

    def __init__(self, path: str | Path, cfg: LlamaConfig, config_path: str | Path | None = None):
        from halo_mlir.params.safetensors_import import open_checkpoint

        self.path, self.cfg = Path(path), cfg
        self._config_path = Path(config_path) if config_path else None
        self._stack = contextlib.ExitStack()
        try:
            self._file_of, _ = open_checkpoint(self.path, cfg, self._stack)
        except BaseException:
            self._stack.close()
            raise

    def rows(self, key: str, start: int, stop: int) -> np.ndarray:
        name = hf_sources(key, self.cfg)[0]
        return self._file_of(name).rows(name, start, stop).astype(np.float32)

    def expert_rows(self, key: str, e: int) -> np.ndarray:
        name = hf_sources(key, self.cfg)[e]
        return self._file_of(name).rows(name, 0, self.shape(key)[1]).astype(np.float32)

    def _tokenizer_path(self) -> Path | None:
        near = [self.path if self.path.is_dir() else self.path.parent]
        if self._config_path is not None:
            near.append(self._config_path.parent)
        for d in near:
            if (d / "tokenizer.json").exists():
                return d / "tokenizer.json"
        self.tokenizer_note = f"no tokenizer.json beside {near[0]}"
        return None

    def tokenizer(self):
        from halo_mlir.params.tokenizer import JsonTokenizer

        path = self._tokenizer_path()
        return None if path is None else JsonTokenizer(path)

    def close(self) -> None:
        self._stack.close()


class GgufSource(RowsSource):
    """A llama GGUF: config from its metadata, block formats dequantized by the `gguf`
    package, Q/K rows un-permuted to HF order (as `import-params --gguf` does)."""

    def __init__(self, path: str | Path):
        from halo_mlir.params.gguf_file import GgufFile
        from halo_mlir.params.gguf_import import check_tensors

        self.path = Path(path)
        self.g = GgufFile(path)
        try:
            self.cfg = self.g.config()
            check_tensors(self.g, self.cfg)
            for key in param_shapes(self.cfg):  # an undecodable format fails here, first
                self.g.rows_f32(key, 0, 1)
        except BaseException:
            self.g.close()
            raise
        # llama.cpp permutes a llama GGUF's Q/K rows; a grok GGUF keeps them as published
        self._heads = {} if self.cfg.family == "grok" else {
            "attn_q": self.cfg.n_heads, "attn_k": self.cfg.n_kv_heads}

    def rows(self, key: str, start: int, stop: int) -> np.ndarray:
        from halo_mlir.params.gguf_import import unpermute

        shape = self.shape(key)
        if len(shape) == 1:
            return self.g.rows_f32(key, 0, 1).reshape(-1)[start:stop]
        heads = self._heads.get(key.split(".")[-2]) if key.startswith("blk.") else None
        if heads is None:
            return self.g.rows_f32(key, start, stop)
        # llama.cpp permutes rows within each head: read whole heads, un-permute, slice.
        head_rows = shape[0] // heads
        first, last = start // head_rows * head_rows, -(-stop // head_rows) * head_rows
        rows = unpermute(self.g.rows_f32(key, first, last), (last - first) // head_rows)
        return rows[start - first:stop - first]

    def expert_rows(self, key: str, e: int) -> np.ndarray:
        n = self.shape(key)[1]
        return self.g.rows_f32(key, e * n, (e + 1) * n)

    def tokenizer(self):
        from halo_mlir.params.tokenizer import GgufTokenizer

        try:
            return GgufTokenizer(self.g)
        except HaloError as e:
            self.tokenizer_note = str(e)
        except Exception as e:  # the tokenizers library's own errors: a broken vocabulary
            self.tokenizer_note = f"{self.path}: the GGUF's tokenizer cannot be built ({e})"
        return None

    def close(self) -> None:
        self.g.close()


def open_source(*, safetensors: str | Path | None = None, gguf: str | Path | None = None,
                hf_config: str | Path | None = None) -> RowsSource:
    """The source for exactly one of a safetensors checkpoint (with its config.json:
    `hf_config`, else the one beside it) and a GGUF file."""
    if bool(safetensors) == bool(gguf):
        raise HaloError("pass exactly one of --safetensors and --gguf")
    if gguf:
        return GgufSource(gguf)
    from halo_mlir import config
    from halo_mlir.params.fp8_checkpoint import scheme_from_checkpoint

    src = Path(safetensors)
    cfg_path = Path(hf_config) if hf_config else (src if src.is_dir() else src.parent) / "config.json"
    scheme = scheme_from_checkpoint(src, cfg_path)
    if scheme is not None:  # its weights are fp8 bytes, not f32 rows
        raise HaloError(f"{src} is already an FP8 checkpoint ({scheme.layout}); import it as it "
                        "is with `import-params --safetensors` (no --quantize)")
    return SafetensorsSource(src, config.from_hf_config(cfg_path), cfg_path)
