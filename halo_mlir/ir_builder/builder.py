"""A thin typed builder over `iree.compiler.ir`.

Ops elsewhere in halo_mlir only call methods of `Builder`; this package is the only one
that imports the MLIR bindings. Every method creates ops at the ambient insertion point
and location, so the caller decides where IR goes (`with b.at("blk.3.attn_q"): ...`).
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Sequence, Union

import numpy as np

from iree.compiler import ir
from iree.compiler.dialects import arith, flow, linalg, math, scf, tensor, util

from halo_mlir.errors import HaloError
from halo_mlir.ir_builder.entry_points import EntryPoints
from halo_mlir.ir_builder.linalg_ext import LinalgExtOps

Value = ir.Value
Dim = Union[int, ir.Value]  # a static size or an `index` SSA value

DYN = ir.ShapedType.get_dynamic_size()

# dtype name -> IR element type constructor.
_ELEMENT_TYPES: dict[str, Callable[[], ir.Type]] = {
    "f32": ir.F32Type.get,
    "f16": ir.F16Type.get,
    "bf16": ir.BF16Type.get,
    "f8e4m3fnuz": ir.Float8E4M3FNUZType.get,
    "f8E4M3FNUZ": ir.Float8E4M3FNUZType.get,  # MLIR's spelling
    "i1": lambda: ir.IntegerType.get_signless(1),
    "i8": lambda: ir.IntegerType.get_signless(8),
    "i32": lambda: ir.IntegerType.get_signless(32),
    "i64": lambda: ir.IntegerType.get_signless(64),
    "index": ir.IndexType.get,
}

_EINSUM = re.compile(r"^([a-z]*(?:,[a-z]*)*)->([a-z]*)$")


class Builder(LinalgExtOps, EntryPoints):
    """Types, constants, structured ops, functions and parameter globals (plus
    iree_linalg_ext ops and the coarse-fences entry points from the mixins).

    Works in a caller's `ir.Context` (it must have IREE's dialects registered, as every
    `iree.compiler.ir.Context` does) or makes its own.
    """

    def __init__(self, context: ir.Context | None = None):
        self.context = context or ir.Context()
        self._types: dict[str, ir.Type] = {}
        self._maps: dict[str, tuple] = {}
        self._globals: dict[str, tuple[str, ir.Type]] = {}
        self.module: ir.Module | None = None
        self._first_function = None
        self._symbols: set[str] = set()
        self.template_dir = None  # kernels render from here (default: the installed templates)

    # ---- types ---------------------------------------------------------------------
    def type(self, dtype: str) -> ir.Type:
        """Element type for a dtype name ("f16", "i64", ...)."""
        t = self._types.get(dtype)
        if t is None:
            try:
                t = self._types[dtype] = _ELEMENT_TYPES[dtype]()
            except KeyError:
                raise HaloError(f"unknown dtype {dtype!r}: choose one of "
                                f"{', '.join(_ELEMENT_TYPES)}") from None
        return t

    def tensor_type(self, shape: Sequence[int | None], dtype: str | ir.Type) -> ir.RankedTensorType:
        """tensor<...> type; `None` in `shape` is a dynamic size."""
        et = self.type(dtype) if isinstance(dtype, str) else dtype
        return ir.RankedTensorType.get([DYN if s is None else s for s in shape], et)

    @staticmethod
    def shape(v: Value) -> list[int | None]:
        return [None if s == DYN else s for s in ir.RankedTensorType(v.type).shape]

    @staticmethod
    def element_type(v: Value) -> ir.Type:
        return ir.RankedTensorType(v.type).element_type

    def dims(self, v: Value) -> list[Dim]:
        """Sizes of `v`: ints where static, `tensor.dim` values where dynamic."""
        return [s if s is not None else tensor.dim(v, self.index(i))
                for i, s in enumerate(self.shape(v))]

    # ---- locations, modules, functions ---------------------------------------------
    @contextlib.contextmanager
    def at(self, name: str):
        """Ops created inside carry the location `name` (e.g. "blk.3.attn_q")."""
        with ir.Location.name(name, context=self.context):
            yield

    def adopt(self, module: ir.Module) -> ir.Module:
        """Work on an existing module (e.g. parsed from a file, for a pass)."""
        self.module = module
        self._first_function = next((op for op in module.body.operations
                                     if op.operation.name in ("util.func", "func.func")), None)
        self._globals.clear()
        self._symbols = {op.attributes["sym_name"].value for op in module.body.operations
                         if "sym_name" in op.attributes}
        return module

    def lookup(self, name: str):
        """The top-level op with symbol `name`, or None."""
        table = ir.SymbolTable(self.module.operation)  # built in C++: no Python loop
        return table[name] if name in table else None

    lookup_global = lookup

    def new_module(self) -> ir.Module:
        self.module = ir.Module.create(loc=ir.Location.unknown(self.context))
        self._first_function = None
        self._globals.clear()
        self._symbols.clear()
        return self.module

    @contextlib.contextmanager
    def function(self, name: str, arg_types: Sequence[ir.Type], result_types: Sequence[ir.Type],
                 private: bool = False):
        """Define `util.func @name`; yields its arguments; the body ends with `ret`."""
        ftype = ir.FunctionType.get(list(arg_types), list(result_types))
        with ir.InsertionPoint(self.module.body):
            fn = util.FuncOp(name, ir.TypeAttr.get(ftype), sym_visibility="private" if private else None)
        self._first_function = self._first_function or fn
        self.current_function = fn
        entry = fn.regions[0].blocks.append(*arg_types)
        with ir.InsertionPoint(entry):
            yield list(entry.arguments)

    def define(self, name: str, arg_types: Sequence[ir.Type],
               body: Callable[..., Value | Sequence[Value]], private: bool = False):
        """Define `util.func @name` whose result types are whatever `body(*args)` returns."""
        with self.function(name, arg_types, [], private=private) as args:
            results = body(*args)
            results = list(results) if isinstance(results, (list, tuple)) else [results]
            self.ret(*results)
            fn = args[0].owner.owner if args else None
        ftype = ir.FunctionType.get(list(arg_types), [r.type for r in results])
        fn.attributes["function_type"] = ir.TypeAttr.get(ftype)
        return fn

    def assume_divisible(self, v: Value, k: int | None) -> Value:
        """`util.assume.int %v<udiv = k>` (v itself when k is None)."""
        if not k or k == 1:
            return v
        attr = ir.Attribute.parse(f"[#util.int.assumption<udiv = {k}>]")
        return util.assume_int([v.type], [v], ir.ArrayAttr.get([attr]))

    def annotate(self, fn=None, *, arg_attrs: dict[int, dict] | None = None, **attrs) -> None:
        """Set attributes on a function (default: the one being defined): ints, strings and
        int lists become IR attributes; `arg_attrs[i]` goes onto argument i."""
        fn = fn or self.current_function
        for name, value in attrs.items():
            fn.attributes[name] = self.attr(value)
        if arg_attrs:
            n = len(ir.FunctionType(ir.TypeAttr(fn.attributes["function_type"]).value).inputs)
            fn.attributes["arg_attrs"] = ir.ArrayAttr.get([
                ir.DictAttr.get({k: self.attr(v) for k, v in arg_attrs.get(i, {}).items()})
                for i in range(n)])

    def attr(self, value) -> ir.Attribute:
        if isinstance(value, ir.Attribute):
            return value
        if isinstance(value, str):
            return ir.StringAttr.get(value)
        if isinstance(value, bool):
            return ir.BoolAttr.get(value)
        if isinstance(value, int):
            return ir.IntegerAttr.get(self.type("i64"), value)
        return ir.DenseI64ArrayAttr.get([int(v) for v in value])

    def ret(self, *values: Value):
        util.return_(list(values))

    def call(self, name: str, args: Sequence[Value], result_types: Sequence[ir.Type]) -> list:
        op = util.CallOp(list(result_types), name, list(args))
        return list(op.results)

    def add_text_once(self, symbol: str, text: str) -> None:
        """Parse MLIR `text` (e.g. a rendered kernel template) and move its top-level ops
        into the module, unless `symbol` is already there. A parse error shows the text
        with line numbers."""
        if symbol in self._symbols:
            return
        try:
            parsed = ir.Module.parse(text, self.context)
        except ir.MLIRError as e:
            numbered = "\n".join(f"{i + 1:4d}  {line}" for i, line in enumerate(text.splitlines()))
            raise HaloError(f"{symbol}: the rendered MLIR does not parse: "
                            f"{' '.join(str(e).split())}\n{numbered}") from None
        where = (ir.InsertionPoint(self._first_function) if self._first_function
                 else ir.InsertionPoint(self.module.body))
        for op in list(parsed.body.operations):
            op.detach_from_parent()
            where.insert(op)
        self._symbols.add(symbol)

    # ---- constants -----------------------------------------------------------------
    def index(self, i: int) -> Value:
        return arith.constant(self.type("index"), i)

    def scalar(self, x: float | int, dtype: str) -> Value:
        t = self.type(dtype)
        if isinstance(t, ir.IntegerType) or dtype == "index":
            return arith.constant(t, int(x))
        return arith.constant(t, ir.FloatAttr.get(t, float(x)))

    def dense(self, array: np.ndarray, dtype: str) -> Value:
        """A small constant tensor (never weights: those are parameter globals)."""
        t = self.tensor_type(array.shape, dtype)
        return arith.constant(t, ir.DenseElementsAttr.get(np.ascontiguousarray(array), type=t))

    # ---- parameters ----------------------------------------------------------------
    def param(self, key: str, shape: Sequence[int], dtype: str, scope: str = "model") -> Value:
        """Load the parameter `scope::key`, declaring its `util.global` once per module."""
        t = self.tensor_type(shape, dtype)
        known = self._globals.get(key)
        if known is None:
            attr = ir.Attribute.parse(f'#flow.parameter.named<"{scope}"::"{key}"> : {t}')
            # Globals go before the first function, in the order the model first uses them.
            where = (ir.InsertionPoint(self._first_function) if self._first_function
                     else ir.InsertionPoint(self.module.body))
            with where, ir.Location.name(key, context=self.context):
                util.global_(key, t, sym_visibility="private", initial_value=attr)
            self._globals[key] = known = (key, t)
        elif known[1] != t:
            raise HaloError(f"parameter {key} used as {t} and as {known[1]}")
        return util.global_load(t, key, is_immutable=True)

    # ---- structured ops ------------------------------------------------------------
    def empty(self, sizes: Sequence[Dim], dtype: str | ir.Type) -> Value:
        et = self.type(dtype) if isinstance(dtype, str) else dtype
        return tensor.empty(list(sizes), et)

    def filled(self, sizes: Sequence[Dim], value: float, dtype: str) -> Value:
        """tensor.empty + linalg.fill: an accumulator initialised to `value`."""
        return linalg.fill(self.scalar(value, dtype), outs=[self.empty(sizes, dtype)])

    def _einsum_maps(self, spec: str):
        cached = self._maps.get(spec)
        if cached is None:
            m = _EINSUM.match(spec.replace(" ", ""))
            if not m:
                raise ValueError(f"bad einsum spec {spec!r}")
            operands = (m.group(1).split(",") if m.group(1) else []) + [m.group(2)]
            dims = "".join(dict.fromkeys("".join(operands)))
            kinds = ["parallel" if d in m.group(2) else "reduction" for d in dims]
            iters = ir.ArrayAttr.get([ir.Attribute.parse(f"#linalg.iterator_type<{k}>")
                                      for k in kinds])
            cached = self._maps[spec] = (self._affine_maps(dims, operands), iters)
        return cached

    def generic(self, spec: str, ins: Sequence[Value], outs: Sequence[Value],
                body: Callable[..., Value | Sequence[Value]],
                fixed: dict[int, dict[int, int]] | None = None) -> Value:
        """linalg.generic with einsum-style maps: "bsd,d->bsd" (dims absent from the
        output are reductions). `body(*in_elems, *out_elems)` returns the yielded values.
        `fixed={i: {pos: c}}`: input i reads index c at its position pos (whatever letter
        the spec puts there)."""
        maps, iters = self._einsum_maps(spec)
        if fixed:
            maps = self._fixed(maps, fixed)
        op = linalg.GenericOp([o.type for o in outs], list(ins), list(outs), maps, iters)
        block = op.regions[0].blocks.append(*[self.element_type(v) for v in (*ins, *outs)])
        with ir.InsertionPoint(block):
            res = body(*block.arguments)
            linalg.YieldOp(list(res) if isinstance(res, (list, tuple)) else [res])
        return op.results[0] if len(outs) == 1 else list(op.results)

    @staticmethod
    def _fixed(maps: ir.ArrayAttr, fixed: dict[int, dict[int, int]]) -> ir.ArrayAttr:
        out = [ir.AffineMapAttr(m).value for m in maps]
        for i, at in fixed.items():
            exprs = [ir.AffineConstantExpr.get(at[p]) if p in at else e
                     for p, e in enumerate(out[i].results)]
            out[i] = ir.AffineMap.get(out[i].n_dims, 0, exprs)
        return ir.ArrayAttr.get([ir.AffineMapAttr.get(m) for m in out])

    def map(self, spec: str, ins: Sequence[Value], dtype: str, fn: Callable[..., Value]) -> Value:
        """Elementwise/broadcast generic into a fresh tensor shaped like the output of
        `spec` (sizes taken from the first input that has each output dim)."""
        operands, out = spec.replace(" ", "").split("->")
        sizes = []
        for c in out:
            src = next(i for i, o in enumerate(operands.split(",")) if c in o)
            sizes.append(self.dims(ins[src])[operands.split(",")[src].index(c)])
        return self.generic(spec, ins, [self.empty(sizes, dtype)], lambda *a: fn(*a[:-1]))

    def matmul_t(self, x: Value, w: Value, acc: Value) -> Value:
        """x[M,K] @ w[N,K]^T accumulated into acc[M,N] (linalg.matmul, transposed B)."""
        maps = self._affine_maps("mnk", ["mk", "nk", "mn"])
        return linalg.matmul(x, w, outs=[acc], indexing_maps=[ir.AffineMapAttr(m).value for m in maps])

    def reshape(self, v: Value, groups: Sequence[Sequence[int]], new_shape: Sequence[Dim]) -> Value:
        """collapse_shape or expand_shape: `groups[i]` lists the result dims (expand) or
        source dims (collapse) that form one dim on the other side."""
        src = self.shape(v)
        et = self.element_type(v)
        static = [s if isinstance(s, int) else None for s in new_shape]
        if len(new_shape) < len(src):
            collapsed = [None if any(src[i] is None for i in g) else
                         int(np.prod([src[i] for i in g])) for g in groups]
            return tensor.collapse_shape(self.tensor_type(collapsed, et), v, _groups(groups))
        # A dynamic source dim whose result group is all static: make it static first.
        want = [int(np.prod([static[i] for i in g])) if all(static[i] is not None for i in g)
                else None for g in groups]
        if any(w is not None and s is None for w, s in zip(want, src)):
            v = tensor.cast(self.tensor_type([w if w is not None else s for w, s in
                                              zip(want, src)], et), v)
        dyn = [s for s in new_shape if not isinstance(s, int)]
        return tensor.expand_shape(self.tensor_type(static, et), v, _groups(groups), dyn,
                                   [DYN if s is None else s for s in static])

    def insert(self, piece: Value, dest: Value, offsets: Sequence[Dim],
               sizes: Sequence[Dim]) -> Value:
        """tensor.insert_slice of `piece` into `dest` at `offsets` (unit strides)."""
        static_off = [o if isinstance(o, int) else DYN for o in offsets]
        static_sz = [z if isinstance(z, int) else DYN for z in sizes]
        return tensor.insert_slice(piece, dest, [o for o in offsets if not isinstance(o, int)],
                                   [z for z in sizes if not isinstance(z, int)], [],
                                   static_off, static_sz, [1] * len(sizes))

    def retype(self, v: Value, shape: Sequence[int | None]) -> Value:
        """tensor.cast to `shape` (e.g. static -> dynamic to match a kernel's signature)."""
        t = self.tensor_type(shape, self.element_type(v))
        return v if v.type == t else tensor.cast(t, v)

    def transpose(self, v: Value, perm: Sequence[int], dims: Sequence[Dim] | None = None) -> Value:
        """`dims`: the sizes of `v` when known (spares `tensor.dim` ops on `v`)."""
        dims = list(dims) if dims is not None else self.dims(v)
        out = self.empty([dims[p] for p in perm], self.element_type(v))
        op = linalg.transpose(v, outs=[out], permutation=list(perm))
        return op if isinstance(op, ir.Value) else op.results[0]

    def slice(self, v: Value, offsets: Sequence[Dim], sizes: Sequence[Dim]) -> Value:
        """tensor.extract_slice with unit strides; result dims follow `sizes`."""
        static_off = [o if isinstance(o, int) else DYN for o in offsets]
        static_sz = [s if isinstance(s, int) else DYN for s in sizes]
        t = self.tensor_type([s if isinstance(s, int) else None for s in sizes],
                             self.element_type(v))
        return tensor.extract_slice(t, v, [o for o in offsets if not isinstance(o, int)],
                                    [s for s in sizes if not isinstance(s, int)], [],
                                    static_off, static_sz, [1] * len(sizes))

    def _affine_maps(self, dims: str, operands: Sequence[str]) -> ir.ArrayAttr:
        key = dims + ":" + ",".join(operands)
        cached = self._maps.get(key)
        if cached is None:
            cached = self._maps[key] = ir.ArrayAttr.get([ir.AffineMapAttr.get(ir.AffineMap.get(
                len(dims), 0, [ir.AffineDimExpr.get(dims.index(c)) for c in op]))
                for op in operands])
        return cached

    @staticmethod
    def tag(v: Value, name: str) -> Value:
        """Put the unit attribute `name` on the op defining v (a mark for later passes)."""
        v.owner.attributes[name] = ir.UnitAttr.get()
        return v

    def barrier(self, v: Value) -> Value:
        """util.optimization_barrier: keep `v` opaque (e.g. a per-layer index kept out of
        kernels so every layer reuses the same ones)."""
        return util.optimization_barrier([v.type], [v])

    def fusion_barrier(self, v: Value) -> Value:
        """`v` kept out of its consumers' dispatch: a `flow.tensor.barrier` on the device
        (IREE fuses nothing across it). Unlike util.optimization_barrier on a tensor, which
        becomes a host wait (`stream.timepoint.await`) in the compiled step, it waits on
        nothing: it only pins where the value lives (the sharding pass re-targets it to each
        device's copy)."""
        return self.pin(v)

    def pin(self, v: Value, device: int = 0) -> Value:
        """`flow.tensor.barrier` on a device: a loop-carried tensor stays in one place
        (without it IREE copies the carried value, e.g. the whole KV cache, every
        iteration)."""
        dyn = [d for d in self.dims(v) if not isinstance(d, int)]
        return flow.tensor_barrier(v, dyn, self.device(device))

    @contextlib.contextmanager
    def loop(self, count: int, carried: Sequence[Value]):
        """`scf.for %i = 0 to count` carrying `carried`; yields (the op, %i, the carried
        block arguments). The body must end with `end_loop(values)`; the op's results are
        the final values."""
        # The step is opaque: scf.for with a constant step of 1 is 'pure' to MLIR, and IREE's
        # clone-to-consumers pass then copies a multi-device loop once per consumer device
        # (the step would run every layer N+1 times at TP N).
        step = self.barrier(self.index(1))
        op = scf.ForOp(self.index(0), self.index(count), step, list(carried))
        with ir.InsertionPoint(op.body):
            yield op, op.induction_variable, list(op.inner_iter_args)

    @staticmethod
    def end_loop(values: Sequence[Value]) -> None:
        scf.yield_(list(values))

    def layer_slice(self, stacked: Value, i: Value) -> Value:
        """Entry `i` of a stacked tensor [L, ...] -> [...]."""
        shape = self.shape(stacked)
        piece = self.slice(stacked, [i] + [0] * (len(shape) - 1), [1, *shape[1:]])
        groups = [[0, 1]] + [[d] for d in range(2, len(shape))] if len(shape) > 1 else []
        return self.reshape(piece, groups, shape[1:])

    # ---- scalar arithmetic inside bodies ---------------------------------------------
    def cast(self, x: Value, dtype: str) -> Value:
        """Float-to-float, int-to-float or index cast, chosen by the two types."""
        to = self.type(dtype)
        frm = x.type
        if frm == to:
            return x
        if isinstance(frm, ir.FloatType) and isinstance(to, ir.FloatType):
            wider = to.width > frm.width
            return arith.extf(to, x) if wider else arith.truncf(to, x)
        if isinstance(frm, ir.IntegerType) and isinstance(to, ir.FloatType):
            return arith.sitofp(to, x)
        if isinstance(frm, ir.IndexType) or isinstance(to, ir.IndexType):
            return arith.index_cast(to, x)
        if isinstance(frm, ir.IntegerType) and isinstance(to, ir.IntegerType):
            return arith.extsi(to, x) if to.width > frm.width else arith.trunci(to, x)
        raise HaloError(f"no cast from {frm} to {to}")

    def extract(self, t: Value, indices) -> Value:
        return tensor.extract(t, list(indices))

    def linalg_index(self, d: int) -> Value:
        return linalg.IndexOp(d).result

    addf = staticmethod(arith.addf)
    subf = staticmethod(arith.subf)
    mulf = staticmethod(arith.mulf)
    divf = staticmethod(arith.divf)
    maxf = staticmethod(arith.maximumf)
    minf = staticmethod(arith.minimumf)
    negf = staticmethod(arith.negf)
    absf = staticmethod(math.absf)
    exp = staticmethod(math.exp)
    tanh = staticmethod(math.tanh)
    rsqrt = staticmethod(math.rsqrt)
    cos = staticmethod(math.cos)
    sin = staticmethod(math.sin)
    select = staticmethod(arith.select)
    andi = staticmethod(arith.andi)
    ori = staticmethod(arith.ori)
    addi = staticmethod(arith.addi)
    muli = staticmethod(arith.muli)
    divsi = staticmethod(arith.divsi)
    remsi = staticmethod(arith.remsi)

    def cmpi(self, pred: str, a: Value, b: Value) -> Value:
        return arith.cmpi(getattr(arith.CmpIPredicate, pred), a, b)

    def cmpf(self, pred: str, a: Value, b: Value) -> Value:
        return arith.cmpf(getattr(arith.CmpFPredicate, pred.upper()), a, b)


def _groups(groups: Sequence[Sequence[int]]) -> ir.ArrayAttr:
    i64 = ir.IntegerType.get_signless(64)
    return ir.ArrayAttr.get([ir.ArrayAttr.get([ir.IntegerAttr.get(i64, d) for d in g])
                             for g in groups])


def walk_nested(op, visit: Callable) -> None:
    """Call `visit(inner)` on every operation nested in `op`'s regions (not `op` itself)."""
    def step(inner):
        visit(inner)
        return ir.WalkResult.ADVANCE
    for region in op.regions:
        for block in region.blocks:
            for inner in block.operations:
                inner.operation.walk(step)


def is_empty_tensor(v) -> bool:
    """`v` is an empty tensor or a slice of one."""
    op = v.owner
    while isinstance(op, ir.Operation) or hasattr(op, "operation"):
        op = op.operation
        if op.name == "tensor.empty":
            return True
        if op.name != "tensor.extract_slice":
            return False
        op = op.operands[0].owner
    return False
