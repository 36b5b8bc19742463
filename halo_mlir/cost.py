"""`halo-mlir cost`: what the compiled program does, read from IREE's stream-level IR.

The module is compiled with `--compile-to=stream` and each entry (`decode_bs{B}$async`,
`prefill_bs{B}$async`, or the plain name when there is no async variant) is *executed
abstractly*: the host function's index arithmetic is evaluated (`arith`, `util.align`, ...,
with `hal.buffer_view.dim` of the arguments taken from the call's shapes, `ABI_DIMS`), its
control flow is followed (`cf.br`/`cf.cond_br`, `util.call`), and every stream command met on
the way is recorded:

- `stream.cmd.execute`: one queue submission, on the device of its `on(...)` affinity;
- `stream.cmd.dispatch` inside it: one kernel launch. Its bytes come from the executable
  (`stream.executable`): each `dispatch.tensor.load`/`store` of a binding, with sizes evaluated
  from the dispatch's push constants; a loaded tensor used only as the source of gathers
  counts the gathered bytes (the KV pages read), one used only as a scatter's destination
  counts nothing (updated in place), a stored scatter counts its updates. FLOPs: 2 per
  multiply-add of contractions (linalg ops with a reduction and a multiply; attention's two
  matmuls); elementwise work is not counted;
- `stream.cmd.copy` inside it: a copy. It is cross-device when the execute marks the queue
  ownership transfer of its source or target: `stream.cmd.invalidate from(<other device>)`
  on the source range, or `stream.cmd.flush to(<other device>)` on the target range (what
  `stream.async.transfer` between devices becomes once scheduled);
- `stream.timepoint.await`: the host waits on the device;
- dependent cross-device steps: the longest chain of submissions in which each step waits
  (through `await(...)` timepoints, joins, allocations) on a submission of another device.

A loop (the `--layer-loop` layer stack) is counted as it runs: its blocks execute once per
iteration; the blocks executed most often (more than once) form its body, reported per
iteration. Per layer of an unrolled program is the difference of two programs of different
depth (`per_layer_by_difference`, `halo-mlir cost A.mlir --minus B.mlir`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

from halo_mlir import cost_model
from halo_mlir.cost_model import Copy, Dispatch
from halo_mlir.errors import HaloError

# The entries' arguments (docs/ABI.md): each dimension by name; the cache arguments follow.
# "ctx_pages" = ceil(context / block_seq_stride), "pages" = the cache's page count.
ABI_DIMS = {
    "decode": [("batch", 1), ("batch",), ("batch",), ("batch", "ctx_pages")],
    "prefill": [("batch", "ctx"), ("batch",), ("batch", "ctx_pages")],
}
CACHE_DIMS = ("pages", None)
ENTRY = re.compile(r"^(decode|prefill)_bs(\d+)(\$async)?$")


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


def evaluate(op, env: dict) -> None:
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


def _segments(op) -> list[list]:
    sizes = list(op.attributes["operandSegmentSizes"])
    out, i = [], 0
    for n in sizes:
        out.append(list(op.operands)[i:i + n])
        i += n
    return out


def _device(affinity) -> int:
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
            seg = _segments(op)
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
    ins, outs = _segments(op)[0], _segments(op)[-1]
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
        evaluate(op, env)
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
    ins, outs = _segments(op)[0], _segments(op)[-1]
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


# ---------------------------------------------------------------------------------------
# Running an entry abstractly
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Event:
    kind: str          # submission, dispatch, copy, host_wait, step
    block: int         # which block of the entry (or of a callee) it came from
    device: int = 0
    record: object = None
    name: str = ""


class _Runner:
    """Executes one entry's host code abstractly, recording events."""

    def __init__(self, program: "Program", kind: str, dims: dict):
        self.p, self.kind, self.dims = program, kind, dims
        self.events: list[Event] = []
        self.block_runs: Counter = Counter()
        self.max_depth = 0
        self._exe_cache: dict = {}
        self._block_ids: dict = {}

    # --- values with meaning beyond integers: timepoints and resource origins ---------
    def run(self, func, args_env: dict | None = None, depth: int = 0):

        if depth > 16:
            raise HaloError("calls nested too deep in the compiled program")
        env = dict(args_env or {})
        region = func.regions[0]
        blocks = list(region.blocks)
        block = blocks[0]
        if depth == 0:
            for i, a in enumerate(block.arguments):
                env[("origin", a)] = ("arg", i)
        steps = 0
        while True:
            bid = self._block_id(func, blocks, block)
            self.block_runs[bid] += 1
            steps += 1
            if steps > 1_000_000:
                raise HaloError("the compiled program's control flow did not terminate")
            nxt = None
            for o in block.operations:
                op = o.operation
                name = op.name
                if name == "cf.br":
                    nxt = (op.successors[0], list(op.operands))
                elif name == "cf.cond_br":
                    cond, t_ops, f_ops = _segments(op)
                    c = env.get(cond[0])
                    if c is None:
                        raise HaloError(f"cannot evaluate the branch condition at {op.location}")
                    nxt = (op.successors[0], t_ops) if c else (op.successors[1], f_ops)
                elif name in ("util.return", "func.return"):
                    return [self._get(env, v) for v in op.operands]
                elif name in ("scf.for", "scf.if", "scf.while", "cf.switch"):
                    raise HaloError(f"unsupported control flow {name} in the compiled program")
                else:
                    self._op(op, env, bid, depth)
            if nxt is None:
                return []
            dest, operands = nxt
            vals = [self._get(env, v) for v in operands]
            for a, val in zip(dest.arguments, vals):
                self._set(env, a, val)
            block = dest

    def _block_id(self, func, blocks, block):
        key = (str(func.attributes["sym_name"]), [i for i, b in enumerate(blocks)
                                                  if b == block][0])
        return self._block_ids.setdefault(key, len(self._block_ids))

    @staticmethod
    def _get(env, v):
        return (env.get(v), env.get(("origin", v)), env.get(("tp", v)))

    @staticmethod
    def _set(env, v, val):
        for key, x in zip((v, ("origin", v), ("tp", v)), val):
            if x is not None:
                env[key] = x
            else:
                env.pop(key, None)

    def _frontier(self, env, values) -> dict:
        out: dict = {}
        for v in values:
            for dev, d in env.get(("tp", v), {}).items():
                out[dev] = max(out.get(dev, 0), d)
        return out

    def _op(self, op, env, bid, depth):

        name = op.name
        evaluate(op, env)
        if name == "hal.buffer_view.dim":
            origin = env.get(("origin", op.operands[0]))
            if origin and origin[0] == "arg":
                env[op.results[0]] = self.dims(self.kind, origin[1],
                                               op.attributes["index"].value)
            return
        if name == "util.global.load":
            env[("origin", op.results[0])] = ("weight", str(op.attributes["global"]))
            return
        if name == "stream.tensor.import":
            src = env.get(("origin", op.operands[0]))
            if src and src[0] == "arg":
                cache = src[1] >= len(ABI_DIMS[self.kind])
                env[("origin", op.results[0])] = ("cache" if cache else "input", src[1])
            return
        if name == "util.call":
            callee = self.p.functions.get(str(op.attributes["callee"]).lstrip("@"))
            if callee is None:
                return
            cenv = {}
            for a, v in zip(callee.regions[0].blocks[0].arguments, op.operands):
                self._set(cenv, a, self._get(env, v))
            for r, val in zip(op.results, self.run(callee, cenv, depth + 1)):
                self._set(env, r, val)
            return
        if name == "stream.timepoint.await":
            self.events.append(Event("host_wait", bid, name=str(op.location)))
        if name == "stream.cmd.execute":
            self._execute(op, env, bid)
            return
        # pass resource origins and timepoints through everything else
        tps = [v for v in op.operands if str(v.type) == "!stream.timepoint"]
        res = [v for v in op.operands if str(v.type).startswith("!stream.resource")]
        for r in op.results:
            t = str(r.type)
            if t == "!stream.timepoint":
                env[("tp", r)] = self._frontier(env, tps)
            elif t.startswith("!stream.resource") and res:
                i = list(op.results).index(r)
                src = res[i] if i < len(res) else res[0]
                if ("origin", src) in env:
                    env[("origin", r)] = env[("origin", src)]

    def _execute(self, op, env, bid):
        # no affinity: the module's only (default) device
        dev = _device(op.attributes["affinity"]) if "affinity" in op.attributes else 0
        resources, sizes, awaits = _segments(op)
        front = self._frontier(env, awaits)
        level = max((d + (k != dev) for k, d in front.items()), default=0)
        if level > self.max_depth:
            self.events.append(Event("step", bid, dev, level - self.max_depth))
            self.max_depth = level
        env[("tp", op.results[0])] = {dev: level}
        self.events.append(Event("submission", bid, dev))
        inner = dict(env)
        block = op.regions[0].blocks[0]
        for a, v in zip(block.arguments, resources):
            inner[("origin", a)] = env.get(("origin", v))
        marks = {}
        self._marks(block, inner, dev, marks)
        self._commands(block, inner, dev, bid, marks)

    def _marks(self, block, env, dev, marks):
        """(resource, offset) -> other device, from invalidate from(...)/flush to(...)."""
        for o in block.operations:
            op = o.operation
            if op.name in ("stream.cmd.invalidate", "stream.cmd.flush"):
                # Both print their other device as `source_affinity` (invalidate from(D),
                # flush to(D)) in IREE 3.13; accept either name.
                attr = next((a for a in ("source_affinity", "target_affinity")
                             if a in op.attributes), None)
                if attr:
                    other = _device(op.attributes[attr])
                    if other != dev:
                        marks[(op.operands[0], env.get(op.operands[2]))] = other
            for r in op.regions:
                for b in r.blocks:
                    self._marks(b, env, dev, marks)

    def _commands(self, block, env, dev, bid, marks):
        for o in block.operations:
            op = o.operation
            name = op.name
            if name in ("stream.cmd.concurrent", "stream.cmd.serial"):
                self._commands(op.regions[0].blocks[0], env, dev, bid, marks)
            elif name == "stream.cmd.dispatch":
                rec = self._dispatch(op, env, dev)
                self.events.append(Event("dispatch", bid, dev, rec, rec.name))
            elif name == "stream.cmd.copy":
                src, _, src_off, dst, _, dst_off, length = op.operands
                peer = marks.get((src, env.get(src_off)), marks.get((dst, env.get(dst_off))))
                n = env.get(length) or 0
                self.events.append(Event("copy", bid, dev, Copy(dev, n, peer)))
            elif name == "stream.cmd.fill":
                n = env.get(op.operands[3]) if len(op.operands) > 3 else 0
                self.events.append(Event("fill", bid, dev, Copy(dev, n or 0, None)))
            elif name in ("stream.cmd.collective", "stream.cmd.call"):
                self.events.append(Event(name.split(".")[-1], bid, dev))
            else:
                evaluate(op, env)

    def _dispatch(self, op, env, dev) -> Dispatch:
        workload, uniform, resources, sizes, offsets, lengths = _segments(op)
        entry = str(list(op.attributes["entry_points"])[0])
        exe, fn = [s.lstrip("@") for s in entry.split("::")]
        access = [a.value for a in op.attributes["resource_accesses"]]
        push = tuple(env.get(v) for v in uniform)
        key = (exe, fn, push)
        if key not in self._exe_cache:
            func = self.p.executables.get((exe, fn))
            self._exe_cache[key] = analyze_executable(func, list(push)) if func else None
        cost = self._exe_cache[key]
        read = written = kv = weight = 0
        for i, (res, ln, acc) in enumerate(zip(resources, lengths, access)):
            length = env.get(ln) or 0
            r = length if acc & 1 else 0
            w = length if acc & 2 else 0
            if cost is not None and i < len(cost.read):
                r = min(r, cost.read[i]) if cost.read[i] is not None else r
                w = min(w, cost.written[i]) if cost.written[i] is not None else w
            read, written = read + r, written + w
            origin = env.get(("origin", res)) or ("transient",)
            if origin[0] == "cache":
                kv += r
            elif origin[0] == "weight":
                weight += r
        return Dispatch(name=fn, device=dev, bytes_read=read, bytes_written=written,
                        flops=cost.flops if cost else 0, dtype=cost.dtype if cost else "f16",
                        kv_bytes_read=kv, weight_bytes_read=weight)


# ---------------------------------------------------------------------------------------
# The program and its report
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Counts:
    """What one call (or one layer) does, summed over devices."""
    dispatches: float
    cross_copies: float
    cross_copy_bytes: float
    local_copies: float
    submissions: float
    host_waits: float
    dependent_steps: float
    bytes_read: float
    bytes_written: float
    kv_bytes_read: float
    weight_bytes_read: float
    flops: float
    names: dict          # dispatch name -> launches

    def __sub__(self, other: "Counts") -> "Counts":
        names = Counter(self.names)
        names.subtract(other.names)
        return Counts(*(getattr(self, f.name) - getattr(other, f.name)
                        for f in dataclasses.fields(self) if f.name != "names"),
                      names={k: v for k, v in names.items() if v})

    def per_device(self, devices: int) -> "Counts":
        """Each device's share (the dependent steps are one chain: not divided)."""
        return dataclasses.replace(self / devices, dependent_steps=self.dependent_steps)

    def __truediv__(self, n: float) -> "Counts":
        return Counts(*(getattr(self, f.name) / n
                        for f in dataclasses.fields(self) if f.name != "names"),
                      names={k: v / n for k, v in self.names.items()})

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _counts(events) -> Counts:
    ds = [e.record for e in events if e.kind == "dispatch"]
    cs = [e.record for e in events if e.kind == "copy"]
    cross = [c for c in cs if c.cross]
    return Counts(
        dispatches=len(ds), cross_copies=len(cross),
        cross_copy_bytes=sum(c.bytes for c in cross), local_copies=len(cs) - len(cross),
        submissions=sum(e.kind == "submission" for e in events),
        host_waits=sum(e.kind == "host_wait" for e in events),
        dependent_steps=sum(e.record for e in events if e.kind == "step"),
        bytes_read=sum(d.bytes_read for d in ds), bytes_written=sum(d.bytes_written for d in ds),
        kv_bytes_read=sum(d.kv_bytes_read for d in ds),
        weight_bytes_read=sum(d.weight_bytes_read for d in ds),
        flops=sum(d.flops for d in ds), names=dict(Counter(d.name for d in ds)))


@dataclasses.dataclass
class EntryCost:
    """One entry's call: counts, the loop (if any), and the estimate."""
    name: str
    kind: str
    batch: int
    devices: int
    total: Counts
    estimate: cost_model.Estimate
    loop_trips: int = 0                 # iterations of the loop, 0 without one
    loop_body: Counts | None = None     # one iteration of the loop
    per_layer: Counts | None = None     # the loop body, or unrolled layers by difference
    per_layer_source: str = ""
    dispatch_records: list = dataclasses.field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        out = {"entry": self.name, "kind": self.kind, "batch": self.batch,
               "devices": self.devices, "total": self.total.to_json(),
               "estimate": self.estimate.to_json(), "loop_trips": self.loop_trips}
        if self.per_layer is not None:
            out["per_layer"] = self.per_layer.to_json()
            out["per_layer_per_device"] = self.per_layer.per_device(self.devices).to_json()
            out["per_layer_source"] = self.per_layer_source
        return out


@dataclasses.dataclass
class ModuleCost:
    path: str
    target: str
    gpu: str
    devices: int
    context: int
    block_seq_stride: int
    pages: int
    layers: int | None
    entries: list

    def entry(self, kind: str) -> EntryCost:
        return next(e for e in self.entries if e.kind == kind)

    def to_json(self) -> dict:
        return {"module": self.path, "target": self.target, "gpu": self.gpu,
                "devices": self.devices, "context": self.context,
                "block_seq_stride": self.block_seq_stride, "pages": self.pages,
                "layers": self.layers, "entries": [e.to_json() for e in self.entries]}


class Program:
    """A parsed stream-level module: its functions and executables."""

    def __init__(self, text: str, where: str = "<stream>"):
        from iree.compiler import ir

        self.context = ir.Context()
        try:
            self.module = ir.Module.parse(text, self.context)
        except Exception as e:  # MLIRError: not stream-level IR we can read
            raise HaloError(f"{where}: cannot parse the compiled program ({e})") from None
        self.functions, self.executables, self.globals = {}, {}, []
        for o in self.module.body.operations:
            op = o.operation
            if op.name in ("util.func", "func.func"):
                self.functions[op.attributes["sym_name"].value] = op
            elif op.name == "util.global":
                self.globals.append(op.attributes["sym_name"].value)
            elif op.name == "stream.executable":
                exe = op.attributes["sym_name"].value
                for inner in op.regions[0].blocks[0].operations:
                    if inner.operation.name == "builtin.module":
                        for f in inner.operation.regions[0].blocks[0].operations:
                            if f.operation.name == "func.func":
                                fn = f.operation.attributes["sym_name"].value
                                self.executables[(exe, fn)] = f.operation

    def entries(self) -> list[tuple[str, str, int]]:
        """(function, kind, batch) of each decode/prefill entry, the async variant preferred."""
        out = {}
        for name in self.functions:
            m = ENTRY.match(name)
            if m and (m.group(3) or (m.group(1), m.group(2)) not in out):
                out[(m.group(1), m.group(2))] = name
        return sorted(((f, k, int(b)) for (k, b), f in out.items()),
                      key=lambda x: (x[1] != "decode", x[2]))

    def devices(self) -> int:
        found = [int(m) for g in self.globals for m in re.findall(r"^__device_(\d+)$", g)]
        return max(found) + 1 if found else 1

    def layers(self) -> int | None:
        """Decoder blocks named in the parameters (blk.N), None for stacked (loop) weights."""
        found = {int(m) for g in self.globals for m in re.findall(r"blk[._](\d+)[._]", g)}
        return max(found) + 1 if found else None


def dims_for(batch: int, context: int, stride: int, pages: int):
    """The `hal.buffer_view.dim` oracle for a call at `context` tokens (ABI_DIMS)."""
    values = {"batch": batch, "ctx": context, "ctx_pages": -(-context // stride),
              "pages": pages}

    def dims(kind: str, arg: int, index: int) -> int:
        shape = ABI_DIMS[kind][arg] if arg < len(ABI_DIMS[kind]) else CACHE_DIMS
        name = shape[index] if index < len(shape) else None
        if not isinstance(name, str):
            raise HaloError(f"{kind} argument {arg} has no dynamic dimension {index} in the "
                            "ABI; is this a halo-mlir/sharktank paged-Llama module?")
        return values[name]
    return dims


def cost_program(program: Program, gpu, *, context: int, stride: int, pages: int | None,
                 path: str = "", target: str = "gfx942") -> ModuleCost:
    """Run every entry of `program` abstractly and estimate its step time on `gpu`."""
    from halo_mlir.gpus import gpu_spec

    spec = gpu_spec(gpu) if isinstance(gpu, str) else gpu
    entries = program.entries()
    if not any(k == "decode" for _, k, _ in entries):
        raise HaloError(f"{path or 'the module'} has no decode_bs* entry: not a paged-Llama "
                        "module emitted by halo-mlir (or exported by sharktank)")
    devices = program.devices()
    out = []
    for fn, kind, batch in entries:
        n_pages = pages or batch * -(-context // stride)
        runner = _Runner(program, kind, dims_for(batch, context, stride, n_pages))
        runner.run(program.functions[fn])
        out.append(_entry_cost(fn, kind, batch, devices, runner, spec))
    return ModuleCost(path=path, target=target, gpu=spec.name, devices=devices,
                      context=context, block_seq_stride=stride,
                      pages=pages or 0, layers=program.layers(), entries=out)


def _entry_cost(fn, kind, batch, devices, runner: _Runner, spec) -> EntryCost:
    events = runner.events
    total = _counts(events)
    # A loop's blocks run more than once; its header runs once more than its body, so the
    # trip count is the runs of the blocks that hold commands.
    runs = runner.block_runs
    looped = [e for e in events if runs[e.block] > 1]
    trips = max((runs[e.block] for e in looped), default=1)
    body = _counts(looped) / trips if trips > 1 else None
    ds = [e.record for e in events if e.kind == "dispatch"]
    cs = [e.record for e in events if e.kind in ("copy", "fill")]
    est = cost_model.estimate(ds, cs, spec, dependent_steps=total.dependent_steps,
                              host_waits=total.host_waits)
    return EntryCost(name=fn, kind=kind, batch=batch, devices=devices, total=total,
                     estimate=est, loop_trips=trips if trips > 1 else 0, loop_body=body,
                     per_layer=body,
                     per_layer_source=f"loop body ({trips} iterations)" if body else "",
                     dispatch_records=ds)


def per_layer_by_difference(big: ModuleCost, small: ModuleCost) -> ModuleCost:
    """`big` with per_layer = (big - small) / (layers difference), entry by entry."""
    if big.layers is None or small.layers is None or big.layers == small.layers:
        raise HaloError("per layer by difference needs two unrolled programs of different "
                        f"depth (found {big.layers} and {small.layers} layers)")
    n = big.layers - small.layers
    for e in big.entries:
        other = next((s for s in small.entries if s.name == e.name), None)
        if other is None:
            raise HaloError(f"{small.path} has no entry {e.name}")
        e.per_layer = dataclasses.replace((e.total - other.total) / n, names={})
        e.per_layer_source = f"difference of {big.layers} and {small.layers} layers"
    return big


# ---------------------------------------------------------------------------------------
# From a source module
# ---------------------------------------------------------------------------------------

def source_devices(path: Path) -> int:
    """Devices a source module places work on (1 + the highest @__device_N it names)."""
    if path.suffix == ".mlirbc":
        from halo_mlir.api import module_text, read_module

        text = module_text(read_module(path), locations=False)
    else:
        text = path.read_text(errors="replace")
    found = [int(n) for n in re.findall(r"@__device_(\d+)", text)]
    if not re.search(r"@decode_bs\d+\b", text):
        raise HaloError(f"{path} has no decode_bs* entry: not a paged-Llama module emitted by "
                        "halo-mlir (or exported by sharktank)")
    return max(found) + 1 if found else 1


def cost_file(path, *, target: str = "gfx942", tp: int | None = None, gpu: str = "mi300x",
              context: int = 2048, stride: int = 32, pages: int | None = None,
              extra_flags: list | None = None, echo=lambda m: None) -> ModuleCost:
    """Compile `path` to the stream level and cost it (see the module docstring)."""
    from halo_mlir.compile import compile_file
    from halo_mlir.gpus import gpu_spec

    spec = gpu_spec(gpu)  # an unknown GPU fails before the compile
    path = Path(path)
    if not path.exists():
        raise HaloError(f"{path}: no such file")
    if context < 1 or stride < 1 or (pages is not None and pages < 1):
        raise HaloError("--context, --block-seq-stride and --pages must be at least 1")
    devices = source_devices(path)
    tp = tp or devices
    if tp != devices:
        raise HaloError(f"{path} places work on {devices} device(s) but --tp is {tp}; "
                        f"pass --tp {devices}")
    with tempfile.TemporaryDirectory(prefix="halo-cost-") as tmp:
        out = Path(tmp) / "stream.mlir"
        compile_file(path, out, target=target, tp=tp,
                     extra_flags=["--compile-to=stream", *(extra_flags or [])], echo=echo)
        text = out.read_text()
    return cost_program(Program(text, str(path)), spec, context=context, stride=stride,
                        pages=pages, path=str(path), target=target)


# ---------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------

def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x - round(x)) < 1e-9 else f"{x:,.2f}"


def _mb(x: float) -> str:
    return f"{x / 1e6:,.3f} MB"


def format_report(m: ModuleCost, top: int = 8) -> str:
    lines = [f"Cost of {m.path} ({m.target}, {m.devices} device(s), {m.gpu}; context "
             f"{m.context:,} tokens, stride {m.block_seq_stride})"]
    for e in m.entries:
        t, est = e.total, e.estimate
        lines.append(f"\n{e.name} (batch {e.batch}):")
        cols = [("whole call", t)]
        if e.per_layer is not None:
            cols += [("per layer", e.per_layer)]
            if e.devices > 1:
                cols += [("per layer per device", e.per_layer.per_device(e.devices))]
        rows = [("dispatches", "dispatches", _num), ("cross-device copies", "cross_copies", _num),
                ("cross-device bytes", "cross_copy_bytes", _mb),
                ("in-device copies", "local_copies", _num),
                ("submissions", "submissions", _num), ("host waits", "host_waits", _num),
                ("dependent cross-device steps", "dependent_steps", _num),
                ("bytes read", "bytes_read", _mb), ("  of which KV pages", "kv_bytes_read", _mb),
                ("  of which weights", "weight_bytes_read", _mb),
                ("bytes written", "bytes_written", _mb),
                ("GFLOP", "flops", lambda x: f"{x / 1e9:,.3f}")]
        w = max(len(r[0]) for r in rows)
        lines.append("  " + " " * w + "".join(f"  {c:>22}" for c, _ in cols))
        for label, field, fmt in rows:
            lines.append(f"  {label:<{w}}" + "".join(f"  {fmt(getattr(c, field)):>22}"
                                                     for _, c in cols))
        if e.per_layer is not None:
            lines.append(f"  (per layer: {e.per_layer_source})")
        # Kernel names carry shapes (the cache's names its depth): by difference, show the
        # whole call's.
        layer = e.per_layer is not None and bool(e.per_layer.names)
        names = Counter(e.per_layer.names if layer else t.names)
        shown = ", ".join(f"{_short(n)} x{_num(c)}" for n, c in names.most_common(top))
        more = len(names) - top
        lines.append(f"  kernels{' per layer' if layer else ''}: {shown}"
                     + (f", and {more} more" if more > 0 else ""))
        lines.append(f"  estimated {est.seconds * 1e3:,.3f} ms on {m.gpu} (device {est.device}: "
                     f"kernels {est.dispatch_s * 1e3:,.3f} ms [bytes {est.memory_s * 1e3:,.3f}, "
                     f"FLOPs {est.compute_s * 1e3:,.3f}] + launches {est.launch_s * 1e3:,.3f} + "
                     f"copies {est.copy_s * 1e3:,.3f}; dependent steps "
                     f"{est.step_s * 1e3:,.3f}; host waits {est.host_wait_s * 1e3:,.3f})")
    return "\n".join(lines)


def _short(name: str) -> str:
    """`decode_bs4$async_dispatch_21_matmul_4x1024x512_f16...` -> `21_matmul_4x1024x512_f16...`."""
    return re.sub(r"^.*?_dispatch_", "", name)
