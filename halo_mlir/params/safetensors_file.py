"""A safetensors reader that reads row blocks with pread instead of mapping the file.

Mapping a multi-GB checkpoint makes every page read count toward the importer's resident
memory; plain reads keep it at the size of one block. The format: a little-endian u64
header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from halo_mlir.errors import HaloError
from halo_mlir.support.io import shown_bytes
from halo_mlir.params.fd_file import FdFile

_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


class SafetensorsFile(FdFile):
    def __init__(self, path: str | Path):
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise HaloError(f"{self.path}: cannot open ({e.strerror})") from None
        size = os.fstat(self._fd).st_size
        if size == 0:
            self.close()
            raise HaloError(f"{self.path} is empty; expected a safetensors file")
        head = os.pread(self._fd, 9, 0)
        if len(head) < 9 or head[8:9] != b"{":
            # the format: an 8-byte little-endian header length, then a JSON object
            self.close()
            raise HaloError(f"{self.path} is not a safetensors file (it starts with "
                            f"{shown_bytes(head[:8])}; expected an 8-byte header length, then '{{')")
        try:
            (n,) = struct.unpack("<Q", head[:8])
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(os.pread(self._fd, n, 8))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            self.close()
            raise HaloError(f"{self.path}: not a safetensors file ({e}); is it truncated?") \
                from None
        header.pop("__metadata__", None)
        self._base = 8 + n
        self.tensors = header
        for name, info in header.items():
            if self._base + info["data_offsets"][1] > size:
                self.close()
                raise HaloError(f"{self.path}: tensor {name} extends past the end of the file; "
                                "the file is truncated, download it again")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self.tensors[name]["dtype"]
        try:
            return np.dtype(_DTYPES[code])
        except KeyError:
            raise HaloError(f"{self.path}: tensor {name} has dtype {code}; supported: "
                            f"{', '.join(_DTYPES)}") from None

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor (the whole tensor for rank 0)."""
        shape, dtype = self.shape(name), self.dtype(name)
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        begin = self._base + self.tensors[name]["data_offsets"][0] + start * row
        data = os.pread(self._fd, (stop - start) * row, begin)
        return np.frombuffer(data, dtype).reshape((stop - start, *shape[1:]))

