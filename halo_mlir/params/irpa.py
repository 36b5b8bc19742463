"""Streaming IRPA writer: memory stays bounded by the largest tensor.

Tensors are appended to a staging file as they arrive; `commit()` builds the archive from
that file (IREE copies file-backed entries) under a temporary name and renames it into
place, so a failed import leaves no partial `.irpa` behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from halo_mlir.errors import HaloError

_ALIGN = 64


class IrpaWriter:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise HaloError(f"{self.path}: directory {self.path.parent} does not exist")
        try:
            self._staging = tempfile.TemporaryFile(dir=self.path.parent, prefix=".halo-staging-")
        except OSError as e:
            raise HaloError(f"{self.path}: cannot write there ({e.strerror})") from None
        self._entries: list[tuple[str, int, int]] = []
        self.nbytes = 0

    def add(self, key: str, array: np.ndarray) -> None:
        self.add_chunks(key, [array])

    def add_chunks(self, key: str, chunks: Iterable[np.ndarray]) -> None:
        """One entry made of consecutive pieces (e.g. row blocks of a big tensor), so a
        tensor never has to be in memory whole."""
        offset = self._staging.seek(0, os.SEEK_END)
        pad = -offset % _ALIGN
        if pad:
            self._staging.write(b"\0" * pad)
            offset += pad
        length = 0
        for chunk in chunks:
            data = np.ascontiguousarray(chunk)
            self._staging.write(memoryview(data.reshape(-1).view(np.uint8)))
            length += data.nbytes
        self._entries.append((key, offset, length))
        self.nbytes += length

    def commit(self) -> None:
        from iree import runtime as rt

        self._staging.flush()
        index = rt.ParameterIndex()
        handle = rt.FileHandle.wrap_fd(self._staging.fileno())
        for key, offset, length in self._entries:
            index.add_from_file_handle(key, handle, length, offset)
        tmp = self.path.with_name(f".{self.path.name}.partial")
        try:
            index.create_archive_file(str(tmp))
            os.replace(tmp, self.path)
        except Exception as e:
            tmp.unlink(missing_ok=True)
            raise HaloError(f"{self.path}: writing the archive failed ({e})") from None
        finally:
            self.close()

    def close(self) -> None:
        self._staging.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.close()


def rank_paths(path: str | Path, tp: int) -> list[Path]:
    """NAME.irpa -> [NAME.rank0.irpa, ...] (ABI.md)."""
    path = Path(path)
    stem = path.name[:-len(".irpa")] if path.name.endswith(".irpa") else path.name
    return [path.with_name(f"{stem}.rank{i}.irpa") for i in range(tp)]


class ShardedIrpaWriter:
    """One IRPA per rank: a tensor the plan splits goes to rank i as `KEY.shard.i`; a
    replicated one is stored once, in rank 0. A tensor is held whole while it is split, so
    memory is bounded by the largest tensor."""

    def __init__(self, path: str | Path, tp: int, sharding_of):
        self.paths = rank_paths(path, tp)
        self.tp = tp
        self.sharding_of = sharding_of  # key -> Split or Replicated (plan.weight_sharding)
        self.writers = [IrpaWriter(p) for p in self.paths]
        self.nbytes = 0

    def add(self, key: str, array: np.ndarray) -> None:
        self.add_chunks(key, [array])

    def add_chunks(self, key: str, chunks: Iterable[np.ndarray]) -> None:
        from halo_mlir.sharding_passes.plan import Split

        array = np.concatenate([np.asarray(c) for c in chunks], axis=0)
        s = self.sharding_of(key, array.shape, self.tp)
        if not isinstance(s, Split):
            self.writers[0].add(key, array)
            self.nbytes += array.nbytes
            return
        if array.shape[s.dim] % self.tp:
            raise HaloError(f"{key}: dim {s.dim} ({array.shape[s.dim]}) does not split "
                            f"{self.tp} ways; pick a TP degree that divides it")
        for i, piece in enumerate(np.split(array, self.tp, axis=s.dim)):
            self.writers[i].add(f"{key}.shard.{i}", piece)
            self.nbytes += piece.nbytes

    def commit(self) -> None:
        try:
            for w in self.writers:
                w.commit()
        except Exception:
            for p in self.paths:
                p.unlink(missing_ok=True)
            raise

    def close(self) -> None:
        for w in self.writers:
            w.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.close()


def writer(path: str | Path, tp: int = 1):
    """An IrpaWriter for tp 1, else a ShardedIrpaWriter following the TP plan."""
    if tp == 1:
        return IrpaWriter(path)
    from halo_mlir.sharding_passes.plan import weight_sharding

    return ShardedIrpaWriter(path, tp, weight_sharding)
