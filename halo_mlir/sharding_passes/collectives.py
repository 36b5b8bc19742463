"""Collectives in one process: `flow.tensor.transfer`s between devices plus local math.

IREE's `flow.collective.*` need RCCL and one process per GPU (and `local-task` has none),
so reductions are built from transfers:
- `ring` (default, bandwidth-optimal): reduce-scatter then all-gather; device j sums the
  j-th 1/N chunk from every device, then every device collects all reduced chunks. Each
  device sends and receives 2(N-1)/N of the tensor.
- `star` (sharktank's form): everything to device 0, summed there, sent back. Device 0
  receives and sends (N-1) whole tensors.
"""

from __future__ import annotations

import dataclasses
import math

from iree.compiler import ir
from iree.compiler.dialects import flow

from halo_mlir.errors import HaloError

MODES = ("ring", "star")


@dataclasses.dataclass
class Stats:
    """Transfers emitted, and their bytes with every dynamic dim taken as 1."""
    transfers: int = 0
    bytes: int = 0
    all_reduces: int = 0
    received: dict = dataclasses.field(default_factory=dict)  # device -> bytes in

    def add(self, other: "Stats", times: int = 1) -> None:
        self.transfers += other.transfers * times
        self.bytes += other.bytes * times
        self.all_reduces += other.all_reduces * times
        for d, n in other.received.items():
            self.received[d] = self.received.get(d, 0) + n * times


def _bytes(v) -> int:
    t = ir.RankedTensorType(v.type)
    elems = math.prod(1 if d == ir.ShapedType.get_dynamic_size() else d for d in t.shape)
    return elems * max(1, t.element_type.width // 8)


def transfer(b, v, device: int, stats: Stats):
    dims = [d for d in b.dims(v) if not isinstance(d, int)]
    stats.transfers += 1
    stats.bytes += _bytes(v)
    stats.received[device] = stats.received.get(device, 0) + _bytes(v)
    return flow.tensor_transfer(v, dims, b.device(device))


def _sum(b, values):
    """Elementwise sum accumulated in f32, cast back to the inputs' type."""
    rank = len(b.shape(values[0]))
    letters = "abcdefgh"[:rank]
    spec = ",".join([letters] * len(values)) + "->" + letters
    et = b.element_type(values[0])
    dtype = str(et)  # f32, f16 or bf16

    def body(*xs):
        acc = b.cast(xs[0], "f32")
        for x in xs[1:]:
            acc = b.addf(acc, b.cast(x, "f32"))
        return b.cast(acc, dtype)
    return b.map(spec, values, dtype, body)


def _chunk(b, v, dim: int, j: int, parts: int):
    dims = b.dims(v)
    size = dims[dim] // parts
    offsets = [0] * len(dims)
    offsets[dim] = j * size
    sizes = list(dims)
    sizes[dim] = size
    return b.slice(v, offsets, sizes)


def _concat(b, pieces, dim: int):
    dims = b.dims(pieces[0])
    full = list(dims)
    full[dim] = dims[dim] * len(pieces)
    out = b.empty(full, b.element_type(pieces[0]))
    for j, p in enumerate(pieces):
        offsets = [0] * len(dims)
        offsets[dim] = j * dims[dim]
        out = b.insert(p, out, offsets, dims)
    return out


def all_reduce(b, values: list, mode: str, stats: Stats) -> list:
    """Per-device partial sums -> the full sum on every device."""
    tp = len(values)
    stats.all_reduces += 1
    if mode == "star":
        total = _sum(b, [values[0]] + [transfer(b, v, 0, stats) for v in values[1:]])
        return [total] + [transfer(b, total, i, stats) for i in range(1, tp)]
    if mode != "ring":
        raise HaloError(f"unknown --allreduce {mode!r}: choose one of {', '.join(MODES)}")
    dim = len(b.shape(values[0])) - 1
    if b.shape(values[0])[dim] % tp:
        raise HaloError(f"ring all-reduce needs the last dim ({b.shape(values[0])[dim]}) "
                        f"divisible by {tp}; use --allreduce star")
    reduced = []
    for j in range(tp):  # reduce-scatter: device j owns chunk j
        parts = [_chunk(b, v, dim, j, tp) for v in values]
        reduced.append(_sum(b, [p if i == j else transfer(b, p, j, stats)
                                for i, p in enumerate(parts)]))
    return [_concat(b, [r if j == k else transfer(b, r, k, stats)
                        for j, r in enumerate(reduced)], dim) for k in range(tp)]


def all_gather(b, values: list, dim: int, stats: Stats) -> list:
    """Per-device pieces along `dim` -> the whole tensor on every device."""
    return [_concat(b, [v if j == k else transfer(b, v, k, stats)
                        for j, v in enumerate(values)], dim) for k in range(len(values))]


def gather_to(b, values: list, dim: int, device: int, stats: Stats):
    """Per-device pieces along `dim` -> the whole tensor on `device` only."""
    return _concat(b, [v if j == device else transfer(b, v, device, stats)
                       for j, v in enumerate(values)], dim)
