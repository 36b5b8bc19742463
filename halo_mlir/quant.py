"""Block-quantized weight formats executed natively (llama.cpp's Q4_1 and Q8_0).

A kept-quantized weight `KEY` [N, K] is stored as typed fields of its 32-element blocks,
each an IRPA entry `KEY:FIELD` of shape [N, K/32, ...]:
- Q8_0 (34 bytes a block): `d` f16 scale, `qs` 32 x i8; w = d * q.
- Q4_1 (20 bytes a block): `d` f16 scale, `m` f16 min, `qs` 16 x u8 (stored as i8), the
  low nibbles holding elements 0..15 and the high nibbles 16..31; w = d * q + m.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from halo_mlir.errors import HaloError

BLOCK = 32


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    name: str  # our name, also the kernel family: "q8_0", "q4_1"
    ggml: str  # gguf.GGMLQuantizationType name
    block_bytes: int
    # field -> (byte offset in a block, byte count, numpy dtype, trailing shape)
    fields: dict

    def split(self, raw: np.ndarray, n: int, k: int) -> dict[str, np.ndarray]:
        """Raw blocks uint8 [n, k/32 * block_bytes] -> {field: array [n, k/32, ...]}."""
        blocks = raw.reshape(n, k // BLOCK, self.block_bytes)
        out = {}
        for field, (offset, size, dtype, tail) in self.fields.items():
            part = np.ascontiguousarray(blocks[:, :, offset:offset + size])
            out[field] = part.view(dtype).reshape(n, k // BLOCK, *tail)
        return out

    def field_shapes(self, n: int, k: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """{field: (shape, IR dtype)} of a kept-quantized [n, k] weight."""
        ir_dtype = {np.float16: "f16", np.int8: "i8"}
        return {f: ((n, k // BLOCK, *tail), ir_dtype[dtype])
                for f, (_, _, dtype, tail) in self.fields.items()}


FORMATS = {
    "q8_0": QuantFormat("q8_0", "Q8_0", 34, {"d": (0, 2, np.float16, ()),
                                             "qs": (2, 32, np.int8, (32,))}),
    "q4_1": QuantFormat("q4_1", "Q4_1", 20, {"d": (0, 2, np.float16, ()),
                                             "m": (2, 2, np.float16, ()),
                                             "qs": (4, 16, np.int8, (16,))}),
}
BY_GGML = {f.ggml: f for f in FORMATS.values()}


def quant_format(name: str) -> QuantFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise HaloError(f"unknown quantized format {name!r}: choose one of "
                        f"{', '.join(FORMATS)}") from None
