"""Writing output files atomically: a temporary name, then a rename."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from halo_mlir.errors import HaloError


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w"):
    """Yield a file open at a temporary name beside `path`; rename it into place only
    when the block finishes without error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        f = open(tmp, mode)
    except OSError as e:
        raise HaloError(f"{path}: cannot write ({e.strerror}); check the directory exists "
                        "and is writable") from None
    try:
        with f:
            yield f
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
