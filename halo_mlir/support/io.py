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


def shown_bytes(head: bytes) -> str:
    """The first bytes of a file as a reader can compare them: text when printable."""
    if head and all(32 <= c < 127 for c in head):
        return repr(head.decode())
    return "0x" + head.hex()


def check_header(path: str | Path, what: str, magics: tuple[bytes, ...], at: int = 0,
                 expected: str | None = None) -> Path:
    """`path` exists, is not empty and holds one of `magics` at byte `at`; else a one-line
    error naming what the file starts with (the readers' own errors say far less)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(max(8, *(at + len(m) for m in magics)))
    except FileNotFoundError:
        raise HaloError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise HaloError(f"{path} is a directory, not {what}") from None
    except OSError as e:
        raise HaloError(f"{path}: cannot read ({e.strerror})") from None
    if not head:
        raise HaloError(f"{path} is empty; expected {what}")
    if not any(head[at:at + len(m)] == m for m in magics):
        want = expected or " or ".join(repr(m.decode()) for m in magics)
        raise HaloError(f"{path} is not {what} (it starts with {shown_bytes(head[:8])}; expected "
                        f"{want})")
    return path


# Parameter files by suffix (what iree.runtime.ParameterIndex reads); None: no magic.
PARAMETER_MAGIC = {".irpa": ("an IRPA parameter file", (b"IRPA",)),
                   ".gguf": ("a GGUF file", (b"GGUF",)), ".safetensors": None}


def check_parameter_file(path: str | Path) -> Path:
    path = Path(path)
    kind = PARAMETER_MAGIC.get(path.suffix, PARAMETER_MAGIC[".irpa"])
    if kind is None:
        return check_header(path, "a safetensors file", (b"",))
    return check_header(path, *kind)


def check_vmfb(path: str | Path) -> Path:
    """A compiled module: a zip archive (what iree-compile writes) or a bare FlatBuffer
    with IREE's file identifier."""
    what = "a compiled module (.vmfb)"
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            if b"IREE" in f.read(12)[4:]:
                return Path(path)
    return check_header(path, what, (b"PK\x03\x04",),
                        expected="'PK', the zip archive iree-compile writes")
