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
