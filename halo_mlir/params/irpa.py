"""Streaming IRPA writer: memory stays bounded by the largest tensor.

Tensors are appended to a staging file as they arrive; `commit()` builds the archive from
that file (IREE copies file-backed entries) under a temporary name and renames it into
place, so a failed import leaves no partial `.irpa` behind.
"""

from __future__ import annotations

import functools

import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from halo_mlir.errors import HaloError

_ALIGN = 64


def _temp(directory: Path, path: Path):
    try:
        return tempfile.TemporaryFile(dir=directory, prefix=".halo-staging-")
    except OSError as e:
        raise HaloError(f"{path}: cannot write there ({e.strerror})") from None


def _write(f, chunks: Iterable[np.ndarray]) -> int:
    length = 0
    for chunk in chunks:
        data = np.ascontiguousarray(chunk)
        f.write(memoryview(data.reshape(-1).view(np.uint8)))
        length += data.nbytes
    return length


class IrpaWriter:
    """Entries in the order added. `append(key, ...)` grows an entry that other entries may
    come between (a stacked weight gets one layer at a time, as an importer walks the
    checkpoint layer by layer); each such entry is staged in a file of its own."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise HaloError(f"{self.path}: directory {self.path.parent} does not exist")
        self._staging = _temp(self.path.parent, self.path)
        self._entries: list[tuple[str, object, int, int]] = []  # key, file, offset, length
        self._growing: dict[str, list] = {}  # key -> [file, length]
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
        length = _write(self._staging, chunks)
        self._entries.append((key, self._staging, offset, length))
        self.nbytes += length

    def append(self, key: str, chunks: Iterable[np.ndarray]) -> None:
        """Add `chunks` at the end of entry `key` (created on first use)."""
        grow = self._growing.get(key)
        if grow is None:
            grow = self._growing[key] = [_temp(self.path.parent, self.path), 0]
            self._entries.append((key, grow[0], 0, None))
        n = _write(grow[0], chunks)
        grow[1] += n
        self.nbytes += n

    def commit(self) -> None:
        from iree import runtime as rt

        index = rt.ParameterIndex()
        handles = {}
        for key, f, offset, length in self._entries:
            if id(f) not in handles:
                f.flush()
                handles[id(f)] = rt.FileHandle.wrap_fd(f.fileno())
            length = self._growing[key][1] if length is None else length
            index.add_from_file_handle(key, handles[id(f)], length, offset)
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
        for f, _ in self._growing.values():
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.close()


def _joined(chunks: Iterable[np.ndarray]) -> np.ndarray:
    """Row blocks as one array (a single chunk as it is: a 0-d scale cannot be concatenated)."""
    arrays = [np.asarray(c) for c in chunks]
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)


def rank_paths(path: str | Path, tp: int) -> list[Path]:
    """NAME.irpa -> [NAME.rank0.irpa, ...] (docs/ABI.md)."""
    path = Path(path)
    stem = path.name[:-len(".irpa")] if path.name.endswith(".irpa") else path.name
    return [path.with_name(f"{stem}.rank{i}.irpa") for i in range(tp)]


class ShardedIrpaWriter:
    """One IRPA per rank: a tensor the plan splits goes to rank i as `KEY.shard.i`; a
    replicated one is stored once, in rank 0. A tensor is held whole while it is split, so
    memory is bounded by the largest tensor."""

    def __init__(self, path: str | Path, tp: int, sharding_of, shard_key=None):
        from halo_mlir.sharding_passes.plan import shard_key as plain

        self.paths = rank_paths(path, tp)
        self.tp = tp
        self.sharding_of = sharding_of  # key -> Split or Replicated (plan.weight_sharding)
        self.shard_key = shard_key or plain  # (key, rank) -> its piece's key (plan.shard_key)
        self.writers = [IrpaWriter(p) for p in self.paths]
        self.nbytes = 0

    def add(self, key: str, array: np.ndarray) -> None:
        self.add_chunks(key, [array])

    def add_chunks(self, key: str, chunks: Iterable[np.ndarray]) -> None:
        from halo_mlir.sharding_passes.plan import Split

        array = _joined(chunks)
        s = self.sharding_of(key, array.shape, self.tp)
        if not isinstance(s, Split):
            self.writers[0].add(key, array)
            self.nbytes += array.nbytes
            return
        if array.shape[s.dim] % self.tp:
            raise HaloError(f"{key}: dim {s.dim} ({array.shape[s.dim]}) does not split "
                            f"{self.tp} ways; pick a TP degree that divides it")
        for i, piece in enumerate(np.split(array, self.tp, axis=s.dim)):
            self.writers[i].add(self.shard_key(key, i), piece)
            self.nbytes += piece.nbytes

    def append(self, key: str, chunks: Iterable[np.ndarray], *, split_as: str) -> None:
        """Add one layer (`chunks`) to the stacked entry `key`, split like the per-layer
        key `split_as`: rank i's `KEY.shard.i` is [layers, ...] of its pieces."""
        from halo_mlir.sharding_passes.plan import Split

        array = _joined(chunks)
        s = self.sharding_of(split_as, array.shape, self.tp)
        if not isinstance(s, Split):
            self.writers[0].append(key, [array])
            self.nbytes += array.nbytes
            return
        for i, piece in enumerate(np.split(array, self.tp, axis=s.dim)):
            self.writers[i].append(self.shard_key(key, i), [piece])
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


class StackedLayout:
    """Puts per-layer keys (`blk.{i}.NAME`) into stacked entries (`blk.NAME.stacked`,
    [layers, ...]) of the wrapped writer, one layer at a time, in layer order."""

    def __init__(self, inner):
        self.inner = inner
        self.next_layer: dict[str, int] = {}

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes

    def add(self, key: str, array: np.ndarray) -> None:
        self.add_chunks(key, [array])

    def add_chunks(self, key: str, chunks: Iterable[np.ndarray]) -> None:
        from halo_mlir.params.names import layer_of, stacked_key

        stacked = stacked_key(key)
        if stacked is None:
            return self.inner.add_chunks(key, chunks)
        want = self.next_layer.get(stacked, 0)
        if layer_of(key) != want:
            raise HaloError(f"internal error: {key} arrived out of layer order (expected "
                            f"layer {want})")
        self.next_layer[stacked] = want + 1
        if isinstance(self.inner, ShardedIrpaWriter):
            self.inner.append(stacked, chunks, split_as=key)
        else:
            self.inner.append(stacked, chunks)

    def commit(self) -> None:
        self.inner.commit()

    def close(self) -> None:
        self.inner.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.close()


def writer(path: str | Path, tp: int = 1, layout: str = "per-layer", moe: str = "ffn"):
    """An IrpaWriter for tp 1, else a ShardedIrpaWriter following the TP plan (`moe`: how
    the experts split, plan.MOE_PARALLEL); with layout `stacked`, block weights go into
    stacked entries."""
    from halo_mlir.params.names import LAYOUTS

    if layout not in LAYOUTS:
        raise HaloError(f"unknown --layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if tp == 1:
        w = IrpaWriter(path)
    else:
        from halo_mlir.sharding_passes.plan import shard_key, weight_sharding

        w = ShardedIrpaWriter(path, tp, functools.partial(weight_sharding, moe=moe),
                              functools.partial(shard_key, moe=moe))
    return StackedLayout(w) if layout == "stacked" else w
