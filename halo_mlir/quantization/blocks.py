"""Block-quantized weight formats executed natively (llama.cpp's Q8_0, Q4_1, Q4_K, Q6_K).

A kept-quantized weight `KEY` [N, K] is stored as typed fields of its blocks (32 elements for
Q8_0/Q4_1, 256-element super-blocks for the K-quants), each an IRPA entry `KEY:FIELD` of shape
[N, K/block, ...]. Element e of a block sits where the field shapes below say; the kernels
(templates/<format>_*.mlir.j2) and `halo_mlir.kernels.quantized.dequantize` read them so.

- Q8_0 (34 bytes a block of 32): `d` f16 [N, K/32]; `qs` i8 [N, K/32, 32]; w = d * q.
- Q4_1 (20 bytes a block of 32): `d` f16 [N, K/32] scale; `m` f16 [N, K/32] min; `qs` i8
  [N, K/32, 16], the low nibbles holding elements 0..15 and the high nibbles 16..31;
  w = d * q + m.
- Q4_K (144 bytes a block of 256, eight sub-blocks of 32): `d` f16 [N, K/256]; `dmin` f16
  [N, K/256]; `sc` i8 [N, K/256, 8] and `m` i8 [N, K/256, 8]: the 6-bit sub-block scales
  and mins (0..63), unpacked at import from llama.cpp's 12 packed bytes; `qs` i8
  [N, K/256, 4, 32]: byte (j, i) holds element 64j + i in its low nibble and 64j + 32 + i in
  its high nibble. Element e is in sub-block s = e // 32; w = d * sc[s] * q - dmin * m[s].
  (148 bytes a block as stored: the scales and mins cost 4 bytes more than packed.)
- Q6_K (210 bytes a block of 256): `d` f16 [N, K/256]; `sc` i8 [N, K/256, 16] signed scales
  of 16-element groups; `ql` i8 [N, K/256, 2, 64]: byte (g, r) holds the low 4 bits of
  element 128g + r (low nibble) and of 128g + 64 + r (high nibble); `qh` i8 [N, K/256, 2, 32]:
  byte (g, i), bits 2t..2t+1, holds the high 2 bits of element 128g + 32t + i (t = 0..3).
  q = low | high << 4 (0..63); w = d * sc[e // 16] * (q - 32). The fields are llama.cpp's
  bytes as they are (block order ql, qh, scales, d), only split.

Stacked mixture-of-experts weights `[E, N, K]` (`blk.{i}.ffn_*_exps.weight`) keep the same
fields with the expert in front: `KEY:FIELD` [E, N, K/block, ...] (expert e at index e), read
by the `{format}_expert_matmul` kernels and, sliced per expert, by `{format}_matmul`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from halo_mlir.errors import lookup

BLOCK = 32  # Q8_0 / Q4_1
SUPER_BLOCK = 256  # the K-quants (llama.cpp's QK_K)


def _slices(layout: dict) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """Fields that are byte ranges of a block: {field: (offset, size)} -> split function."""
    def split(blocks: np.ndarray) -> dict[str, np.ndarray]:
        return {f: np.ascontiguousarray(blocks[:, :, o:o + s]) for f, (o, s) in layout.items()}
    return split


def _q4_k(blocks: np.ndarray) -> dict[str, np.ndarray]:
    """llama.cpp's Q4_K block: d, dmin (f16), 12 bytes of packed 6-bit scales and mins
    (bytes 0-3: low 6 bits of scales 0-3, top 2 bits = high bits of scales 4-7; 4-7 the same
    for mins; 8-11: low nibble = low 4 bits of scale 4+i, high nibble = of min 4+i), 128 qs."""
    packed = blocks[:, :, 4:16].reshape(*blocks.shape[:2], 3, 4)
    lo, mid, hi = packed[..., 0, :], packed[..., 1, :], packed[..., 2, :]
    sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)
    m = np.concatenate([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], axis=-1)
    return {"d": blocks[:, :, 0:2], "dmin": blocks[:, :, 2:4], "sc": sc, "m": m,
            "qs": blocks[:, :, 16:144]}


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    name: str  # our name, also the kernel family: "q8_0", "q4_1", "q4_k", "q6_k"
    ggml: str  # gguf.GGMLQuantizationType name
    block: int  # elements a block
    block_bytes: int  # bytes a block in the GGUF
    # field -> (numpy dtype, trailing shape), in the kernels' argument order
    fields: dict
    # raw blocks uint8 [n, k/block, block_bytes] -> {field: uint8 array [n, k/block, ...]}
    unpack: Callable[[np.ndarray], dict[str, np.ndarray]]

    def split(self, raw: np.ndarray, n: int, k: int) -> dict[str, np.ndarray]:
        """Raw blocks uint8 [n, k/block * block_bytes] -> {field: array [n, k/block, ...]}."""
        parts = self.unpack(raw.reshape(n, k // self.block, self.block_bytes))
        return {f: np.ascontiguousarray(parts[f]).view(dtype).reshape(n, k // self.block, *tail)
                for f, (dtype, tail) in self.fields.items()}

    def field_shapes(self, n: int, k: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """{field: (shape, IR dtype)} of a kept-quantized [n, k] weight."""
        ir_dtype = {np.float16: "f16", np.int8: "i8"}
        return {f: ((n, k // self.block, *tail), ir_dtype[dtype])
                for f, (dtype, tail) in self.fields.items()}


FORMATS = {
    "q8_0": QuantFormat("q8_0", "Q8_0", BLOCK, 34,
                        {"d": (np.float16, ()), "qs": (np.int8, (32,))},
                        _slices({"d": (0, 2), "qs": (2, 32)})),
    "q4_1": QuantFormat("q4_1", "Q4_1", BLOCK, 20,
                        {"d": (np.float16, ()), "m": (np.float16, ()), "qs": (np.int8, (16,))},
                        _slices({"d": (0, 2), "m": (2, 2), "qs": (4, 16)})),
    "q4_k": QuantFormat("q4_k", "Q4_K", SUPER_BLOCK, 144,
                        {"d": (np.float16, ()), "dmin": (np.float16, ()), "sc": (np.int8, (8,)),
                         "m": (np.int8, (8,)), "qs": (np.int8, (4, 32))}, _q4_k),
    "q6_k": QuantFormat("q6_k", "Q6_K", SUPER_BLOCK, 210,
                        {"d": (np.float16, ()), "sc": (np.int8, (16,)),
                         "ql": (np.int8, (2, 64)), "qh": (np.int8, (2, 32))},
                        _slices({"ql": (0, 128), "qh": (128, 64), "sc": (192, 16),
                                 "d": (208, 2)})),
}
BY_GGML = {f.ggml: f for f in FORMATS.values()}


def quant_format(name: str) -> QuantFormat:
    return lookup(FORMATS, name, "quantized format")
