"""Reading gfx942 ISA dumped by iree-compile (`--iree-hal-dump-executable-files-to=DIR`):
split the `*.rocmasm` text by kernel and count each kernel's vector-memory loads by width.

    from halo_mlir.toolchain.isa import load_widths
    for name, w in load_widths(dump).items():
        print(name, w)   # {'b128': 12, 'b16': 4, ...}

Widths: `dwordx4` 128 bits, `dwordx3` 96, `dwordx2` 64, `dword` 32, `ushort`/`sshort`/
`short_d16*` 16, `ubyte`/`sbyte`/`ubyte_d16*` 8. Scalar loads (`s_load_*`: kernel arguments,
constants) are not counted: only `global_`/`buffer_`/`flat_load_*`, the loads of tensor data.
"""

from __future__ import annotations

import re
from pathlib import Path

_KERNEL = re.compile(r"^\s*\.type\s+(\S+),@function\s*$", re.M)
_LOAD = re.compile(r"^\s*(?:global|buffer|flat)_load_(?:lds_)?(\w+)", re.M)
_BITS = {"dwordx4": 128, "dwordx3": 96, "dwordx2": 64, "dword": 32, "ushort": 16, "sshort": 16,
         "short_d16": 16, "short_d16_hi": 16, "ubyte": 8, "sbyte": 8, "ubyte_d16": 8,
         "ubyte_d16_hi": 8, "sbyte_d16": 8, "sbyte_d16_hi": 8}


def kernels(dump: str | Path) -> dict[str, str]:
    """The dumped ISA split by kernel: {kernel name: its assembly}."""
    text = "".join(p.read_text(errors="replace") for p in sorted(Path(dump).glob("*.rocmasm")))
    parts = _KERNEL.split(text)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def widths(asm: str) -> dict[str, int]:
    """Vector-memory loads in `asm` by width: {'b128': n, 'b64': n, 'b16': n, ...}."""
    out: dict[str, int] = {}
    for suffix in _LOAD.findall(asm):
        key = f"b{_BITS[suffix]}" if suffix in _BITS else suffix
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -_bits(kv[0])))


def _bits(key: str) -> int:
    return int(key[1:]) if key[1:].isdigit() else 0


def load_widths(dump: str | Path, prefix: str = "") -> dict[str, dict[str, int]]:
    """{kernel: widths(kernel's asm)} for every kernel whose name starts with `prefix`."""
    return {name: widths(asm) for name, asm in kernels(dump).items() if name.startswith(prefix)}


def narrow(w: dict[str, int], below: int = 32) -> int:
    """How many of the loads counted in `w` are narrower than `below` bits."""
    return sum(n for k, n in w.items() if 0 < _bits(k) < below)


def table(dump: str | Path, prefix: str = "") -> str:
    """A printable per-kernel table of load widths."""
    rows = load_widths(dump, prefix)
    cols = sorted({k for w in rows.values() for k in w}, key=lambda k: -_bits(k))
    width = max((len(n) for n in rows), default=6)
    lines = [f"{'kernel':{width}}  " + "  ".join(f"{c:>5}" for c in cols)]
    for name, w in rows.items():
        lines.append(f"{name:{width}}  " + "  ".join(f"{w.get(c, 0):5d}" for c in cols))
    return "\n".join(lines)
