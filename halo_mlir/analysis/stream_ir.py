"""Reading IREE's stream-level IR: host index arithmetic folded to numbers (`fold`), and
each executable's bytes and FLOPs per dispatch (`analyze_executable`). `cost.py` runs the
entries with these."""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict



# ---------------------------------------------------------------------------------------
# Evaluating index arithmetic
# ---------------------------------------------------------------------------------------

def _width(t) -> int:
    s = str(t)
    return 64 if s == "index" else int(s[1:]) if re.fullmatch(r"i\d+", s) else 64


def _signed(v: int, w: int) -> int:
    return v - (1 << w) if v >= 1 << (w - 1) else v


_CMP = {0: lambda a, b, w: a == b, 1: lambda a, b, w: a != b,
        2: lambda a, b, w: _signed(a, w) < _signed(b, w),
        3: lambda a, b, w: _signed(a, w) <= _signed(b, w),
        4: lambda a, b, w: _signed(a, w) > _signed(b, w),
        5: lambda a, b, w: _signed(a, w) >= _signed(b, w),
        6: lambda a, b, w: a < b, 7: lambda a, b, w: a <= b, 8: lambda a, b, w: a > b,
        9: lambda a, b, w: a >= b}

_BINARY = {
    "arith.addi": lambda a, b, w: a + b, "arith.subi": lambda a, b, w: a - b,
    "arith.muli": lambda a, b, w: a * b, "arith.divui": lambda a, b, w: a // b,
    "arith.divsi": lambda a, b, w: int(_signed(a, w) / _signed(b, w)),
    "arith.floordivsi": lambda a, b, w: _signed(a, w) // _signed(b, w),
    "arith.ceildivui": lambda a, b, w: -(-a // b),
    "arith.ceildivsi": lambda a, b, w: -(-_signed(a, w) // _signed(b, w)),
    "arith.remui": lambda a, b, w: a % b,
    "arith.remsi": lambda a, b, w: math.fmod(_signed(a, w), _signed(b, w)),
    "arith.maxui": lambda a, b, w: max(a, b), "arith.minui": lambda a, b, w: min(a, b),
    "arith.maxsi": lambda a, b, w: max(_signed(a, w), _signed(b, w)),
    "arith.minsi": lambda a, b, w: min(_signed(a, w), _signed(b, w)),
    "arith.andi": lambda a, b, w: a & b, "arith.ori": lambda a, b, w: a | b,
    "arith.xori": lambda a, b, w: a ^ b, "arith.shli": lambda a, b, w: a << b,
    "arith.shrui": lambda a, b, w: a >> b,
    "arith.shrsi": lambda a, b, w: _signed(a, w) >> b,
    "util.align": lambda a, b, w: -(-a // b) * b,
}
_CASTS = ("arith.index_cast", "arith.index_castui", "arith.extui", "arith.extsi",
          "arith.trunci")
_PASS = ("util.optimization_barrier", "util.assume.int")


def fold(op, env: dict) -> None:
    """Set env[result] for an integer/index op whose operands are known (else nothing)."""
    name = op.name
    if name == "arith.constant":
        from iree.compiler import ir

        if isinstance(op.attributes["value"], ir.IntegerAttr):
            w = _width(op.results[0].type)
            env[op.results[0]] = op.attributes["value"].value % (1 << w)
        return
    args = [env.get(v) for v in op.operands]
    if name in _PASS:
        for r, a in zip(op.results, op.operands):
            if a in env:
                env[r] = env[a]
        return
    if name == "iree_tensor_ext.dispatch.workload.ordinal":
        if args[0] is not None:
            env[op.results[0]] = args[0]
        return
    if any(a is None or not isinstance(a, int) for a in args) or len(op.results) != 1:
        return
    w = _width(op.results[0].type)
    if name in _BINARY:
        aw = _width(op.operands[0].type)
        v = _BINARY[name](*args, aw)
    elif name in _CASTS:
        v = args[0] if name != "arith.extsi" else _signed(args[0], _width(op.operands[0].type))
    elif name == "arith.cmpi":
        v = int(_CMP[op.attributes["predicate"].value](*args, _width(op.operands[0].type)))
    elif name == "arith.select":
        v = args[1] if args[0] else args[2]
    else:
        return
    env[op.results[0]] = int(v) % (1 << w)


def segments(op) -> list[list]:
    sizes = list(op.attributes["operandSegmentSizes"])
    out, i = [], 0
    for n in sizes:
        out.append(list(op.operands)[i:i + n])
        i += n
    return out


def device_of(affinity) -> int:
    m = re.search(r"@__device_(\d+)", str(affinity))
    return int(m.group(1)) if m else 0


# ---------------------------------------------------------------------------------------
# Executables: bytes and FLOPs of one dispatch
# ---------------------------------------------------------------------------------------

def _elem_bytes(t) -> int:
    s = str(t)
    if s.startswith("f8") or s in ("i1", "i8"):
        return 1
    if s == "index":
        return 8
    m = re.fullmatch(r"b?[fi](\d+)", s)
    return max(1, int(m.group(1)) // 8) if m else 4


def _dtype(t) -> str:
    s = str(t)
    return "fp8" if s.startswith("f8") else s if s in ("f16", "bf16", "f32") else "f32"


def _affine_results(text: str) -> tuple[int, list]:
    """(dim count, results) of `affine_map<(d0, d1) -> (d0, d1 * 2)>`: a result is its dim
    number when it is a plain dim, else None."""
    m = re.search(r"\(([^)]*)\)(?:\[[^\]]*\])?\s*->\s*\((.*)\)>?\s*$", text)
    if not m:
        return 0, []
    n = len([d for d in m.group(1).split(",") if d.strip()])
    res = [int(r.strip()[1:]) if re.fullmatch(r"d\d+", r.strip()) else None
           for r in m.group(2).split(",") if r.strip()]
    return n, res


@dataclasses.dataclass
class ExeCost:
    """Per binding (in the dispatch's order): bytes read and written; FLOPs; dtype."""
    read: list
    written: list
    flops: int
    dtype: str


class _Shapes:
    """Concrete shapes of the tensors of one executable function."""

    def __init__(self, env):
        self.env, self.known = env, {}

    def __call__(self, v):
        from iree.compiler import ir

        if v in self.known:
            return self.known[v]
        try:
            t = ir.RankedTensorType(v.type)
        except ValueError:
            return None
        static = list(t.shape)
        dyn = [i for i, d in enumerate(static) if d == ir.ShapedType.get_dynamic_size()]
        if dyn:
            vals = self._dynamic(v, len(static))
            if vals is None or len(vals) < len(dyn):
                return None
            for i, x in zip(dyn, vals):
                static[i] = x
        shape = tuple(static)
        self.known[v] = shape
        return shape

    def _dynamic(self, v, rank):
        """Values of v's dynamic dims in order, from its defining op."""
        from iree.compiler import ir

        owner = v.owner
        if not isinstance(owner, ir.OpView) and not isinstance(owner, ir.Operation):
            return None
        op = owner.operation
        name = op.name
        env = self.env
        if name in ("iree_tensor_ext.dispatch.tensor.load", "tensor.extract_slice"):
            seg = segments(op)
            sizes = seg[3] if name.endswith("load") else seg[2]
            return [env.get(s) for s in sizes]
        if name in ("tensor.empty", "tensor.splat"):
            return [env.get(s) for s in op.operands if str(s.type) == "index"]
        if name == "tensor.expand_shape":
            return [env.get(s) for s in list(op.operands)[1:]]
        # A destination-passing op (linalg, linalg_ext, ...): the last operand of the
        # result's type is its init, whose shape the result has.
        inits = [o for o in op.operands if o.type == v.type]
        if inits and inits[-1] != v:
            s = self(inits[-1])
            if s is not None:
                t = ir.RankedTensorType(v.type)
                return [s[i] for i in range(rank) if t.is_dynamic_dim(i)]
        if op.operands and len(op.operands) >= 1:
            s = self(op.operands[0])
            if s is not None and len(s) == rank:
                t = ir.RankedTensorType(v.type)
                return [s[i] for i in range(rank) if t.is_dynamic_dim(i)]
        return None

    def bytes(self, v):
        from iree.compiler import ir

        s = self(v)
        return None if s is None or None in s else math.prod(s) * _elem_bytes(
            ir.RankedTensorType(v.type).element_type)


def _contraction_flops(op, shapes: _Shapes) -> tuple[int, str] | None:
    """(FLOPs, dtype) of a linalg contraction or an attention op, else None."""
    name = op.name
    if name == "iree_linalg_ext.attention":
        maps = [str(m) for m in op.attributes["indexing_maps"]]
        ops = list(op.operands)
        q, k, v = ops[0], ops[1], ops[2]
        out = op.results[0]
        sizes = {}
        for m, val in ((maps[0], q), (maps[1], k), (maps[2], v), (maps[-1], out)):
            s = shapes(val)
            if s is None:
                return None
            for j, d in enumerate(_affine_results(m)[1]):
                if d is not None:
                    sizes[d] = s[j]
        dims = [set(d for d in _affine_results(m)[1] if d is not None) for m in maps]
        qk = math.prod(sizes[d] for d in dims[0] | dims[1])
        pv = math.prod(sizes[d] for d in dims[2] | dims[-1])
        from iree.compiler import ir

        return 2 * (qk + pv), _dtype(ir.RankedTensorType(q.type).element_type)
    if not name.startswith("linalg.") or "operandSegmentSizes" not in op.attributes:
        return None
    body = [o.operation.name for o in op.regions[0].blocks[0].operations] if op.regions else []
    if not any(b in ("arith.mulf", "arith.muli") for b in body) and name == "linalg.generic":
        return None
    ins, outs = segments(op)[0], segments(op)[-1]
    if "indexing_maps" in op.attributes:
        maps = [str(m) for m in op.attributes["indexing_maps"]]
    elif name == "linalg.matmul":
        maps = ["affine_map<(d0, d1, d2) -> (d0, d2)>", "affine_map<(d0, d1, d2) -> (d2, d1)>",
                "affine_map<(d0, d1, d2) -> (d0, d1)>"]
    elif name == "linalg.batch_matmul":
        maps = ["affine_map<(d0, d1, d2, d3) -> (d0, d1, d3)>",
                "affine_map<(d0, d1, d2, d3) -> (d0, d3, d2)>",
                "affine_map<(d0, d1, d2, d3) -> (d0, d1, d2)>"]
    else:
        return None
    n_dims = _affine_results(maps[0])[0]
    iters = str(op.attributes["iterator_types"]) if "iterator_types" in op.attributes else ""
    if name == "linalg.generic" and "reduction" not in iters:
        return None
    sizes = {}
    for m, val in zip(maps, ins + outs):
        s = shapes(val)
        if s is None:
            continue
        for j, d in enumerate(_affine_results(m)[1]):
            if d is not None and j < len(s) and s[j] is not None:
                sizes[d] = s[j]
    if len(sizes) < n_dims or not ins:
        return None
    from iree.compiler import ir

    try:
        et = ir.ShapedType(ins[0].type).element_type
    except ValueError:
        et = ins[0].type
    return 2 * math.prod(sizes.values()), _dtype(et)


def analyze_executable(func, push: list) -> ExeCost:
    """Bytes per binding and FLOPs of one executable function for push constants `push`."""
    from iree.compiler import ir

    args = list(func.regions[0].blocks[0].arguments)
    bindings = [a for a in args if str(a.type) == "!stream.binding"]
    consts = [a for a in args if str(a.type) != "!stream.binding"]
    env = {a: p for a, p in zip(consts, push) if p is not None}
    shapes = _Shapes(env)
    index = {b: i for i, b in enumerate(bindings)}
    subspan, users, ops = {}, defaultdict(list), []
    for o in func.regions[0].blocks[0].operations:
        op = o.operation
        ops.append(op)
        fold(op, env)
        for i, v in enumerate(op.operands):
            users[v].append((op, i))
        for inner in _nested(op):  # values captured by bodies: (use, its top-level op)
            for i, v in enumerate(inner.operands):
                users[v].append((inner, op))
        if op.name == "stream.binding.subspan" and op.operands[0] in index:
            subspan[op.results[0]] = index[op.operands[0]]
    read, written = [0] * len(bindings), [0] * len(bindings)
    flops, dtype, biggest = 0, "f16", -1
    for op in ops:
        if op.name == "iree_tensor_ext.dispatch.tensor.load" and op.operands[0] in subspan:
            v = op.results[0]
            n = _read_bytes(v, users, shapes)
            read[subspan[op.operands[0]]] += n if n is not None else -10 ** 18
        elif op.name == "iree_tensor_ext.dispatch.tensor.store" and op.operands[1] in subspan:
            v = op.operands[0]
            src = v.owner.operation if isinstance(v.owner, (ir.OpView, ir.Operation)) else None
            n = (shapes.bytes(src.operands[0]) if src is not None
                 and src.name == "iree_linalg_ext.scatter" else shapes.bytes(v))
            written[subspan[op.operands[1]]] += n if n is not None else -10 ** 18
        else:
            f = _contraction_flops(op, shapes)
            if f:
                flops += f[0]
                if f[0] > biggest:
                    biggest, dtype = f[0], f[1]
    # -1e18 marks an unknown size: the caller falls back to the binding's length.
    return ExeCost([r if r >= 0 else None for r in read],
                   [w if w >= 0 else None for w in written], flops, dtype)


def _nested(op):
    for r in op.regions:
        for b in r.blocks:
            for o in b.operations:
                yield o.operation
                yield from _nested(o.operation)


def _iterations(op, shapes) -> list | None:
    """The loop sizes of a linalg op (every dim of its indexing maps), when known."""
    if "indexing_maps" not in op.attributes or "operandSegmentSizes" not in op.attributes:
        return None
    maps = [str(m) for m in op.attributes["indexing_maps"]]
    ins, outs = segments(op)[0], segments(op)[-1]
    sizes = {}
    for m, val in zip(maps, ins + outs):
        s = shapes(val)
        for j, d in enumerate(_affine_results(m)[1]):
            if s is not None and d is not None and j < len(s) and s[j] is not None:
                sizes[d] = s[j]
    return list(sizes.values()) if len(sizes) == _affine_results(maps[0])[0] else None


def _read_bytes(v, users, shapes) -> int | None:
    """Bytes a kernel reads of loaded tensor `v`: gathered rows when v only feeds gathers
    (as their source), one element per iteration when only `tensor.extract`s in a body read
    it (an embedding lookup; a mixture of experts' decode contraction reading each token's
    expert rows, per (token, slot) with no reuse between them), nothing when it is only a
    scatter's destination, else all."""
    from iree.compiler import ir

    uses = users.get(v, [])
    full = shapes.bytes(v)
    if uses and all(op.name == "tensor.extract" and not isinstance(i, int) for op, i in uses):
        per = _elem_bytes(ir.RankedTensorType(v.type).element_type)
        outs = [_iterations(top, shapes) or (shapes(top.results[0]) if top.results else None)
                for _, top in uses]
        if all(o is not None and None not in o for o in outs):
            n = sum(math.prod(o) * per for o in outs)
            return min(n, full) if full is not None else n
    if uses and all(op.name == "iree_linalg_ext.gather" and i == 0 for op, i in uses):
        parts = [shapes.bytes(op.results[0]) for op, _ in uses]
        if all(p is not None for p in parts):
            return min(sum(parts), full) if full is not None else sum(parts)
    if uses and all(op.name == "iree_linalg_ext.scatter" and i == len(op.operands) - 1
                    for op, i in uses):
        return 0
    return full


_LAYER_LOC = re.compile(r"^blk\.(\d+)$")
_BLOCK_OP_LOC = re.compile(r"^blk\.\*\.(.+)$")


def emitted_at(location) -> str:
    """The emitter's name for an op from its location: `blk.3.attn_q` for
    `callsite("blk.*.attn_q" at callsite("blk.3" at "decode_bs4"))`, `blk.3.attention` for a
    templated kernel's op inside it, `output` for `callsite("output" at "decode_bs4")`; a
    layer-loop body has no layer index (`blk.*.attn_q`). "" when it names none."""
    names = [n for n in re.findall(r'"([^"]*)"', str(location)) if n and n != "-"]
    layer = next((m.group(1) for n in names if (m := _LAYER_LOC.match(n))), None)
    op = next((m.group(1) for n in names if (m := _BLOCK_OP_LOC.match(n))), None)
    if op is not None:
        return f"blk.{layer if layer is not None else '*'}.{op}"
    return next((n for n in names if not re.match(r"^(decode|prefill)_bs\d+", n)
                 and not _LAYER_LOC.match(n)), "")
