"""The SPMD sharding pass: a TP1 entry function -> the same program on N devices.

Input: an `$impl` function (tensor in, tensor out) whose parameters (util.globals) and
in-place arguments carry `halo.split` annotations (see `annotate.py`). The pass walks the
function in order and, with one rule per op kind (`rules.py`), decides each value's
sharding (replicated, split along a dim, or partial sums) from its operands' shardings
and the op's indexing maps, then emits one copy of the op per device with local shapes.
Where a consumer needs another layout it inserts collectives made of
`flow.tensor.transfer`s (`collectives.py`): all-reduce of partial sums, all-gather of the
logits. Weights become per-device globals with `stream.affinity`; the entry wrappers are
rebuilt with one cache argument per device.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from iree.compiler import ir

from halo_mlir.errors import HaloError
from halo_mlir.ir_builder import Builder, walk_nested
from halo_mlir.sharding_passes import collectives
from halo_mlir.sharding_passes.plan import REPLICATED, Local, Partial, Split

DYN = ir.ShapedType.get_dynamic_size()


@dataclasses.dataclass
class SV:
    """A sharded value: its sharding and one IR value per device."""
    sharding: object
    values: list


def parse_split(attr) -> Split:
    v = list(ir.DenseI64ArrayAttr(attr))
    return Split(v[0], tuple(v[2:]), v[1]) if len(v) > 1 else Split(v[0])


def split_attr(s: Split) -> list[int]:
    return [s.dim, s.at, *s.factors] if s.factors else [s.dim]


def is_plain(s: Split) -> bool:
    return not s.factors or all(f == 1 for f in s.factors[:s.at])


def local_shape(shape: list[int], s, tp: int) -> list[int]:
    if not isinstance(s, Split):
        return list(shape)
    out = list(shape)
    if out[s.dim] == DYN:
        raise HaloError(f"cannot split dynamic dim {s.dim}")
    out[s.dim] //= tp
    return out


class ShardError(HaloError):
    pass


class Sharder:
    def __init__(self, b: Builder, tp: int, allreduce: str, payload: str = "activation",
                 oneshot_max_bytes: int | None = None, rules: dict[str, Callable] | None = None):
        self.b, self.tp, self.allreduce, self.payload = b, tp, allreduce, payload
        # op name -> rule (rules.RULES): how each op kind is sharded
        self.rules = rules if rules is not None else {}
        if oneshot_max_bytes is None:
            from halo_mlir.toolchain.gpus import gpu_spec
            oneshot_max_bytes = gpu_spec("mi300x").allreduce_oneshot_max_bytes
        self.oneshot_max_bytes = oneshot_max_bytes
        self.env: dict = {}
        self.device_globals: dict[tuple[str, int], tuple[str, ir.Type]] = {}
        self.stats = collectives.Stats()
        self.globals_by_name = {op.attributes["sym_name"].value: op
                                for op in b.module.body.operations
                                if op.operation.name == "util.global"}
        self.callees: dict = {}  # (callee, argument shardings) -> sharded function
        # Partial sums already all-reduced in the block being sharded (innermost last):
        # id(SV) -> (SV, its replicated SV), so a value read by two ops (an RMSNorm reads
        # its input twice) is all-reduced once.
        self.reduced: list[dict] = [{}]
        self.shard_callee = None  # set by the pipeline (it owns function-level sharding)
        self._promises: dict[int, ir.Attribute] = {}
        self._load_attrs: dict[str, dict] = {}
        self._global_text: dict[str, tuple] = {}
        self._private = ir.StringAttr.get("private", context=b.context)

    # ---- helpers -------------------------------------------------------------------
    def devices(self):
        return range(self.tp)

    def promise(self, i: int) -> ir.Attribute:
        """`#hal.device.promise<@__device_i>`, parsed once per device (a TP8 module
        places thousands of globals)."""
        if i not in self._promises:
            self._promises[i] = Builder.device(i)
        return self._promises[i]

    def load(self, sym: str, t: ir.Type):
        """`util.global.load immutable @sym`; built directly (a TP8 module has thousands of
        loads, and the generated builder rebuilds the symbol and unit attributes each
        time: about three times slower)."""
        attrs = self._load_attrs.get(sym)
        if attrs is None:
            attrs = self._load_attrs[sym] = {"global": ir.FlatSymbolRefAttr.get(sym),
                                             "is_immutable": ir.UnitAttr.get()}
        return ir.Operation.create("util.global.load", results=[t], attributes=attrs).result

    def replicated(self, values) -> SV:
        return SV(REPLICATED, list(values))

    def get(self, v) -> SV:
        try:
            return self.env[v]
        except KeyError:
            raise ShardError(f"value {v.get_name()} used before it was sharded") from None

    def materialize(self, sv: SV) -> SV:
        """Replicated on every device (all-reduce partials, all-gather splits)."""
        if isinstance(sv.sharding, Local):
            raise ShardError("a value each device computes for itself (local: a dynamic fp8 "
                             "row scale) cannot be summed or gathered")
        if isinstance(sv.sharding, Partial):
            hit = self.reduced[-1].get(id(sv))
            if hit is not None and hit[0] is sv:
                return hit[1]
            out = self.replicated(collectives.all_reduce(self.b, sv.values, self.allreduce,
                                                         self.stats, self.oneshot_max_bytes))
            self.reduced[-1][id(sv)] = (sv, out)
            return out
        if isinstance(sv.sharding, Split):
            if not is_plain(sv.sharding):
                raise ShardError(f"cannot gather a {sv.sharding} value")
            return self.replicated(collectives.all_gather(self.b, sv.values, sv.sharding.dim,
                                                          self.stats))
        return sv

    def slice_local(self, v, dim: int, i: int):
        """Device i's piece of a replicated tensor along `dim`."""
        b = self.b
        dims = b.dims(v)
        chunk = dims[dim] // self.tp
        offsets = [0] * len(dims)
        offsets[dim] = i * chunk
        sizes = list(dims)
        sizes[dim] = chunk
        return b.slice(v, offsets, sizes)

    def captures(self, op) -> list:
        """(nested op index path, operand index, captured value) for every value that the
        regions of `op` use from outside it, found once per op."""
        found = []
        if not len(op.regions):
            return found

        def visit(inner):
            found.extend((inner, k, v) for k, v in enumerate(inner.operands) if v in self.env)
        walk_nested(op, visit)
        return found

    def clone(self, op, i: int, operands: list, result_types: list, captured: list):
        """Device i's copy of `op` with new operands and result types; values captured by
        its regions are remapped to device i's."""
        new = op.clone()
        for k, v in enumerate(operands):
            new.operands[k] = v
        for r, t in zip(new.results, result_types):
            if r.type != t:
                r.set_type(t)
        if captured:
            def remap(inner):
                for k, v in enumerate(inner.operands):
                    sv = self.env.get(v)
                    if sv is not None:
                        inner.operands[k] = sv.values[i]
            walk_nested(new, remap)
        return new

    def per_device(self, op, operand_svs: list[SV], result_shardings: list,
                   operand_values: Callable[[int], list] | None = None) -> list[SV]:
        """Clone `op` per device; results get `result_shardings` and local types."""
        types = []
        for r, s in zip(op.results, result_shardings):
            t = r.type
            if isinstance(s, Split):
                rt = ir.RankedTensorType(t)
                t = ir.RankedTensorType.get(local_shape(list(rt.shape), s, self.tp),
                                            rt.element_type)
            types.append(t)
        captured = self.captures(op)
        results = [[] for _ in op.results]
        for i in self.devices():
            operands = operand_values(i) if operand_values else [sv.values[i] for sv in operand_svs]
            new = self.clone(op, i, operands, types, captured)
            for k, r in enumerate(new.results):
                results[k].append(r)
        return [SV(s, vals) for s, vals in zip(result_shardings, results)]

    def shard_block(self, block, name: str, terminator: str):
        """Apply the rules to every op of `block` in order; returns its terminator."""
        self.reduced.append({})
        try:
            return self._shard_block(block, name, terminator)
        finally:
            self.reduced.pop()

    def _shard_block(self, block, name: str, terminator: str):
        for op in block.operations:
            if op.operation.name == terminator:
                return op
            rule = self.rules.get(op.operation.name)
            if rule is None:
                raise ShardError(f"the sharding pass has no rule for {op.operation.name} "
                                 f"(in {name})")
            with op.location:
                out = rule(self, op.operation, [self.get(v) for v in op.operands])
            for r, sv in zip(op.results, out):
                self.env[r] = sv
        raise ShardError(f"{name}: a block without {terminator}")

    def reshard(self, sv: SV, want) -> SV:
        """`sv` laid out as `want` (replicated or a plain split)."""
        if sv.sharding == want:
            return sv
        full = self.materialize(sv)
        if isinstance(want, Split):
            return SV(want, [self.slice_local(v, want.dim, i) for i, v in enumerate(full.values)])
        return full

    # ---- globals -------------------------------------------------------------------
    def device_global(self, op_global, i: int, sharding) -> tuple[str, ir.Type]:
        """Device i's copy of a parameter global: `KEY.shard.i` for splits (or the name its
        `halo.shard_name` gives: `expert_shard` for expert parallelism's experts), the same
        key for replicated ones, with `stream.affinity` on device i."""
        name = op_global.attributes["sym_name"].value
        key = (name, i)
        if key in self.device_globals:
            return self.device_globals[key]
        if name not in self._global_text:  # read once for all devices
            self._global_text[name] = (ir.TypeAttr(op_global.attributes["type"]).value,
                                       str(op_global.attributes["initial_value"]))
        t, init = self._global_text[name]
        if isinstance(sharding, Split):
            rt = ir.RankedTensorType(t)
            t = ir.RankedTensorType.get(local_shape(list(rt.shape), sharding, self.tp),
                                        rt.element_type)
            param = init.split('::"')[1].split('"')[0]
            piece = op_global.attributes["halo.shard_name"].value \
                if "halo.shard_name" in op_global.attributes else "shard"
            init = init.replace(f'::"{param}"', f'::"{param}.{piece}.{i}"')
            sym = f"{name}.shard.{i}"
        else:
            sym = f"{name}$dev{i}"
        init = init.rsplit(" : ", 1)[0] + f" : {t}"
        with ir.InsertionPoint(op_global), op_global.location:
            ir.Operation.create("util.global", attributes={
                "sym_name": ir.StringAttr.get(sym), "type": ir.TypeAttr.get(t),
                "sym_visibility": self._private, "initial_value": ir.Attribute.parse(init),
                "stream.affinity": self.promise(i)})
        self.device_globals[key] = (sym, t)
        return sym, t
