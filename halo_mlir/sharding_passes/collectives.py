"""Collectives in one process: `flow.tensor.transfer`s between devices plus local math.

IREE's `flow.collective.*` need RCCL and one process per GPU (and `local-task` has none),
so reductions are built from transfers. The node is fully connected (8 MI300X: 7 xGMI
links each), so every device can send to every other at once. All-reduce modes, named for
what they do:

- `one-shot`: every device receives the N-1 other partial sums and adds them. One
  dependent step, N-1 copies in per device (each over its own link), no slicing and no
  concatenation: the sum is one elementwise op that fuses with its consumer. Moves
  (N-1)/N * N = N-1 tensors into each device: latency-optimal, for small tensors (decode).
- `reduce-scatter`: reduce-scatter then all-gather, directly (not a ring): device j sums
  the j-th 1/N contiguous chunk from every device, then every device receives all reduced
  chunks. Two dependent steps; each device receives 2(N-1)/N of the tensor:
  bandwidth-optimal, for large tensors (prefill).
- `star` (sharktank's form): everything to device 0, summed there, sent back. Device 0
  receives and sends (N-1) whole tensors.
- `auto` (the default): `one-shot` when the tensor's bytes (static shape) are at most the
  GPU's `allreduce_oneshot_max_bytes`, else `reduce-scatter`.

Every mode sums the N partials in device order 0..N-1, accumulating in f32 and rounding
once to the payload's type, so every device holds the same bits.
"""

from __future__ import annotations

import dataclasses
import math

from iree.compiler import ir
from iree.compiler.dialects import flow

from halo_mlir.errors import HaloError

MODES = {
    "auto": "one-shot for tensors up to the GPU's one-shot size, else reduce-scatter",
    "one-shot": "every device receives the N-1 partial sums and adds them (1 step)",
    "reduce-scatter": "reduce-scatter + all-gather of contiguous 1/N chunks (2 steps)",
    "star": "partial sums to device 0, summed there, sent back",
}
RENAMED = {"ring": "reduce-scatter"}  # old names: a clear error naming the new one

# The dtype the partial sums travel in. `activation`: each device rounds its f32 matmul
# accumulator to the activation dtype (f16/bf16) first, as vLLM and sharktank do (half the
# bytes); `f32`: the accumulators travel as they are (TP equals TP1 up to summation order).
PAYLOADS = ("activation", "f32")

# Transfers one all-reduce over N devices performs, by mode.
TRANSFERS = {
    "one-shot": lambda n: n * (n - 1),
    "reduce-scatter": lambda n: 2 * n * (n - 1),
    "star": lambda n: 2 * (n - 1),
}


def check_mode(mode: str) -> str:
    """`mode` if it is an all-reduce mode; a HaloError naming the valid ones otherwise."""
    if mode in MODES:
        return mode
    if mode in RENAMED:
        raise HaloError(f"--allreduce {mode} is now called {RENAMED[mode]!r} (it is a "
                        f"reduce-scatter + all-gather, not a ring); choose one of "
                        f"{', '.join(MODES)}")
    raise HaloError(f"unknown --allreduce {mode!r}: choose one of {', '.join(MODES)}")


def check_payload(payload: str) -> str:
    if payload not in PAYLOADS:
        raise HaloError(f"unknown --allreduce-dtype {payload!r}: choose one of "
                        f"{', '.join(PAYLOADS)}")
    return payload


@dataclasses.dataclass
class Stats:
    """Transfers emitted, and their bytes with every dynamic dim taken as 1."""
    transfers: int = 0
    bytes: int = 0
    all_reduces: int = 0
    received: dict = dataclasses.field(default_factory=dict)  # device -> bytes in
    modes: dict = dataclasses.field(default_factory=dict)  # mode -> all-reduces in it
    reduced: int = 0  # bytes of one device's partial sums, over all all-reduces

    def add(self, other: "Stats", times: int = 1) -> None:
        self.transfers += other.transfers * times
        self.bytes += other.bytes * times
        self.all_reduces += other.all_reduces * times
        self.reduced += other.reduced * times
        for d, n in other.received.items():
            self.received[d] = self.received.get(d, 0) + n * times
        for m, n in other.modes.items():
            self.modes[m] = self.modes.get(m, 0) + n * times


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
    """Elementwise sum accumulated in f32 in the order given, cast back to the inputs'
    type."""
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


def choose(b, v, mode: str, tp: int, oneshot_max_bytes: int) -> str:
    """The mode an all-reduce of `v` (one device's partial sum) uses. `auto`: one-shot up
    to `oneshot_max_bytes`; a dynamic shape (prefill) is taken as large; a tensor whose
    last dim does not divide by `tp` cannot be reduce-scattered, so it goes one-shot."""
    if mode != "auto":
        return mode
    divisible = (b.shape(v)[-1] or 1) % tp == 0
    small = None not in b.shape(v) and _bytes(v) <= oneshot_max_bytes
    return "one-shot" if small or not divisible else "reduce-scatter"


def all_reduce(b, values: list, mode: str, stats: Stats, oneshot_max_bytes: int = 0) -> list:
    """Per-device partial sums -> the full sum on every device."""
    tp = len(values)
    mode = choose(b, values[0], check_mode(mode), tp, oneshot_max_bytes)
    stats.all_reduces += 1
    stats.reduced += _bytes(values[0])
    stats.modes[mode] = stats.modes.get(mode, 0) + 1
    return _ALL_REDUCE[mode](b, values, stats)


def _one_shot(b, values: list, stats: Stats) -> list:
    """Device k receives every other device's partial sum and adds all N in order."""
    return [_sum(b, [v if i == k else transfer(b, v, k, stats) for i, v in enumerate(values)])
            for k in range(len(values))]


def _star(b, values: list, stats: Stats) -> list:
    total = _sum(b, [values[0]] + [transfer(b, v, 0, stats) for v in values[1:]])
    return [total] + [transfer(b, total, i, stats) for i in range(1, len(values))]


def _reduce_scatter(b, values: list, stats: Stats) -> list:
    """Reduce-scatter + all-gather over the tensor flattened to 1-D, so that every chunk is
    contiguous: IREE moves contiguous slices and updates with copies, not kernels."""
    tp = len(values)
    last = b.shape(values[0])[-1]
    if last % tp:
        raise HaloError(f"reduce-scatter all-reduce needs the last dim ({last}) divisible by "
                        f"{tp}; use --allreduce one-shot")
    flat = [_flatten(b, v) for v in values]
    chunks = [_chunk_size(b, v, tp) for v in values]

    def chunk(i, j):  # device i's chunk j
        return b.slice(flat[i], [_times(b, chunks[i], j)], [chunks[i]])
    reduced = [_sum(b, [chunk(i, j) if i == j else transfer(b, chunk(i, j), j, stats)
                        for i in range(tp)]) for j in range(tp)]
    out = []
    for k in range(tp):
        whole = b.empty([_times(b, chunks[k], tp)], b.element_type(flat[k]))
        for j, r in enumerate(reduced):
            piece = r if j == k else transfer(b, r, k, stats)
            whole = b.insert(piece, whole, [_times(b, chunks[k], j)], [chunks[k]])
        out.append(b.reshape(whole, [list(range(len(b.shape(values[k]))))], b.dims(values[k])))
    return out


def _flatten(b, v):
    shape = b.shape(v)
    if len(shape) == 1:
        return v
    total = None if None in shape else math.prod(shape)
    return b.reshape(v, [list(range(len(shape)))], [total])


def _chunk_size(b, v, tp: int):
    """1/tp of v's elements: an int, or an index value (the dynamic dims of v times the
    static ones over tp; the last dim is static and divides by tp)."""
    static = math.prod(d for d in b.shape(v) if d is not None) // tp
    size = static
    for d in b.dims(v):
        if not isinstance(d, int):
            size = b.muli(d, b.index(size)) if isinstance(size, int) else b.muli(size, d)
    return size


def _times(b, size, j: int):
    if isinstance(size, int):
        return size * j
    return b.index(0) if j == 0 else size if j == 1 else b.muli(size, b.index(j))


_ALL_REDUCE = {"one-shot": _one_shot, "reduce-scatter": _reduce_scatter, "star": _star}


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


def all_gather(b, values: list, dim: int, stats: Stats) -> list:
    """Per-device pieces along `dim` -> the whole tensor on every device."""
    return [_concat(b, [v if j == k else transfer(b, v, k, stats)
                        for j, v in enumerate(values)], dim) for k in range(len(values))]


def gather_to(b, values: list, dim: int, device: int, stats: Stats):
    """Per-device pieces along `dim` -> the whole tensor on `device` only."""
    return _concat(b, [v if j == device else transfer(b, v, device, stats)
                       for j, v in enumerate(values)], dim)
