"""TP1 module -> N-device module: annotate with the plan, shard every entry, rebuild the
entry wrappers, verify placement."""

from __future__ import annotations

import dataclasses

from iree.compiler import ir

from halo_mlir.errors import HaloError
from halo_mlir.ir_builder import Builder
from halo_mlir.ir_builder.entry_points import build_entry, impl_functions, remove_entry
from halo_mlir.sharding_passes import collectives
from halo_mlir.sharding_passes.plan import REPLICATED, Split, weight_sharding
from halo_mlir.sharding_passes.rules import RULES
from halo_mlir.sharding_passes.shard import (SV, Sharder, ShardError, local_shape,
                                             parse_split, split_attr)
from halo_mlir.sharding_passes.verify import verify_placement


@dataclasses.dataclass
class Report:
    tp: int
    allreduce: str  # the mode asked for (`auto` picks per all-reduce)
    payload: str  # --allreduce-dtype
    transfers: dict  # entry name -> transfers in it
    bytes: dict  # entry name -> bytes moved (dynamic dims as 1)
    all_reduces: dict
    busiest: dict  # entry name -> most bytes received by one device
    modes: dict  # entry name -> {mode: all-reduces that use it}
    reduced: dict  # entry name -> bytes of one device's partial sums, all all-reduces


def param_key(g) -> str | None:
    init = g.attributes["initial_value"] if "initial_value" in g.attributes else None
    text = str(init) if init is not None else ""
    return text.split('::"')[1].split('"')[0] if "#flow.parameter.named" in text else None


def annotate(b: Builder, tp: int) -> None:
    """Apply the plan: `halo.split` on parameter globals and on KV-cache arguments."""
    for op in b.module.body.operations:
        if op.operation.name != "util.global" or "halo.split" in op.attributes:
            continue
        key = param_key(op)
        shape = ir.RankedTensorType(ir.TypeAttr(op.attributes["type"]).value).shape
        s = weight_sharding(key, shape, tp) if key else REPLICATED
        if isinstance(s, Split):
            if shape[s.dim] % tp:
                raise HaloError(f"--tp {tp} does not divide dim {s.dim} ({shape[s.dim]}) of "
                                f"{key}; pick a TP degree that divides it")
            op.attributes["halo.split"] = ir.DenseI64ArrayAttr.get(split_attr(s))
    for fn in impl_functions(b.module):
        arg_attrs = list(ir.ArrayAttr(fn.attributes["arg_attrs"])) \
            if "arg_attrs" in fn.attributes else []
        new = []
        for d in arg_attrs:
            d = ir.DictAttr(d)
            entries = {n.name: n.attr for n in d}
            if "halo.kv_cache" in entries and "halo.split" not in entries:
                factors = list(ir.DenseI64ArrayAttr(entries["halo.kv_cache"]))
                if factors[2] % tp:
                    raise HaloError(f"--tp {tp} does not divide the kv heads ({factors[2]}); "
                                    f"the KV cache splits by kv head: use a TP degree that "
                                    f"divides {factors[2]}")
                entries["halo.split"] = ir.DenseI64ArrayAttr.get(split_attr(Split(1, tuple(factors), 2)))
            new.append(ir.DictAttr.get(entries))
        if arg_attrs:
            fn.attributes["arg_attrs"] = ir.ArrayAttr.get(new)


def _arg_splits(fn) -> list:
    if "arg_attrs" not in fn.attributes:
        return []
    out = []
    for d in ir.ArrayAttr(fn.attributes["arg_attrs"]):
        d = ir.DictAttr(d)
        out.append(parse_split(d["halo.split"]) if "halo.split" in d else None)
    return out


def _ints(fn, name):
    return list(ir.DenseI64ArrayAttr(fn.attributes[name])) if name in fn.attributes else []


def shard_function(b: Builder, s: Sharder, fn) -> None:
    name = fn.attributes["sym_name"].value
    ftype = ir.FunctionType(ir.TypeAttr(fn.attributes["function_type"]).value)
    inputs, results = list(ftype.inputs), list(ftype.results)
    splits = _arg_splits(fn) or [None] * len(inputs)
    inplace = _ints(fn, "halo.inplace")
    regular = len(results) - len(inplace)
    slots, new_inputs, arg_devices = [], [], []
    for t, sp in zip(inputs, splits):
        if sp is None:
            slots.append([len(new_inputs)])
            new_inputs.append(t)
            arg_devices.append(0)
        else:
            rt = ir.RankedTensorType(t)
            local = ir.RankedTensorType.get(local_shape(list(rt.shape), sp, s.tp), rt.element_type)
            slots.append(list(range(len(new_inputs), len(new_inputs) + s.tp)))
            new_inputs += [local] * s.tp
            arg_devices += list(range(s.tp))
    new_results = results[:regular]
    for k in inplace:
        new_results += [new_inputs[j] for j in slots[k]]
    s.stats = collectives.Stats()
    with b.function(f"{name}.sharded", new_inputs, new_results, private=True) as args:
        new_fn = b.current_function
        old_args = fn.regions[0].blocks[0].arguments
        for k, (old, sp) in enumerate(zip(old_args, splits)):
            if sp is None:
                v = args[slots[k][0]]
                s.env[old] = SV(REPLICATED, [v] + [collectives.transfer(b, v, i, s.stats)
                                                   for i in range(1, s.tp)])
            else:
                s.env[old] = SV(sp, [args[j] for j in slots[k]])
        ret = _shard_body(s, fn, name)
        _return(b, s, ret, regular, inplace, splits)
    divisors = _ints(fn, "halo.divisors")
    for i in range(0, len(divisors), 3):
        divisors[i] = slots[divisors[i]][0]
    b.annotate(new_fn, **{
        "halo.entry": fn.attributes["halo.entry"].value,
        "halo.inplace": [j for k in inplace for j in slots[k]],
        "halo.arg_devices": arg_devices,
        "halo.result_devices": [0] * regular,
        **({"halo.divisors": divisors} if divisors else {}),
    })
    s.report = (s.stats.transfers, s.stats.bytes, s.stats.all_reduces,
                max(s.stats.received.values(), default=0), dict(s.stats.modes),
                s.stats.reduced)
    fn.operation.erase()
    new_fn.attributes["sym_name"] = ir.StringAttr.get(name)
    s.env.clear()


def _shard_body(s: Sharder, fn, name: str):
    """Apply the rules to every op of `fn`'s body in order; returns its util.return."""
    return s.shard_block(fn.regions[0].blocks[0], name, "util.return")


def shard_callee(b: Builder, parent: Sharder, name: str, arg_shardings: list):
    """Shard private function `name` for the given argument shardings into
    `name.tpN.K`: one argument and one result per device for each original one.
    Returns (new name, result shardings, flattened result types, its transfer stats)."""
    fn = b.lookup(name)
    if fn is None:
        raise ShardError(f"util.call to @{name}, which is not in the module")
    tp = parent.tp
    ftype = ir.FunctionType(ir.TypeAttr(fn.attributes["function_type"]).value)
    inputs = []
    for t, sh in zip(ftype.inputs, arg_shardings):
        if isinstance(sh, Split):
            rt = ir.RankedTensorType(t)
            t = ir.RankedTensorType.get(local_shape(list(rt.shape), sh, tp), rt.element_type)
        inputs += [t] * tp
    s = Sharder(b, tp, parent.allreduce, parent.payload, parent.oneshot_max_bytes, RULES)
    s.device_globals, s.globals_by_name = parent.device_globals, parent.globals_by_name
    s.callees, s.shard_callee = parent.callees, parent.shard_callee
    new_name = f"{name}.tp{tp}.{len(parent.callees)}"
    outer = b.current_function
    with b.function(new_name, inputs, [], private=True) as args:
        new_fn = b.current_function
        for k, (old, sh) in enumerate(zip(fn.regions[0].blocks[0].arguments, arg_shardings)):
            s.env[old] = SV(sh, list(args[k * tp:(k + 1) * tp]))
        result_shardings, values = [], []
        for v in _shard_body(s, fn, name).operands:
            # Partial sums leave as they are: the caller all-reduces them where they are
            # consumed, at the shapes it knows (a kernel's dynamic rows are static there in
            # decode, so `--allreduce auto` can one-shot them).
            sv = s.get(v)
            result_shardings.append(sv.sharding)
            values += sv.values
        b.ret(*values)
    types = [v.type for v in values]
    new_fn.attributes["function_type"] = ir.TypeAttr.get(ir.FunctionType.get(inputs, types))
    b.annotate(new_fn, **{"halo.arg_devices": list(range(tp)) * len(arg_shardings),
                          "halo.result_devices": list(range(tp)) * len(result_shardings)})
    b.current_function = outer
    return new_name, result_shardings, types, s.stats


def _return(b: Builder, s: Sharder, op, regular: int, inplace: list, splits: list) -> None:
    values = []
    for v in list(op.operands)[:regular]:
        sv = s.get(v)
        if isinstance(sv.sharding, Split):
            values.append(collectives.gather_to(b, sv.values, sv.sharding.dim, 0, s.stats))
        else:
            values.append(s.materialize(sv).values[0])
    for v, k in zip(list(op.operands)[regular:], inplace):
        sv = s.get(v)
        if splits[k] is not None:
            if sv.sharding != splits[k]:
                raise ShardError(f"the in-place result for argument {k} is {sv.sharding}, the "
                                 f"argument is {splits[k]}")
            values += sv.values
        else:
            values.append(s.materialize(sv).values[0])
    b.ret(*values)


def _erase_uncalled(module, names: set) -> None:
    """Sharded callees that no call uses (a loop sharded twice leaves its first try's)."""
    called = set()

    def visit(op):
        if op.name == "util.call":
            called.add(ir.FlatSymbolRefAttr(op.attributes["callee"]).value)
        return ir.WalkResult.ADVANCE
    for op in module.body.operations:  # calls sit in functions: skip the globals
        if op.operation.name == "util.func":
            op.operation.walk(visit)
    for op in list(module.body.operations):
        if "sym_name" in op.attributes and op.attributes["sym_name"].value in names - called:
            op.operation.erase()


def shard_module(module, tp: int, *, allreduce: str = "auto", allreduce_dtype: str = "activation",
                 oneshot_max_bytes: int | None = None, verify: bool = True) -> Report:
    """Shard every entry of `module` (emitted by halo_mlir, TP1) over `tp` devices.
    `allreduce`: a mode of `collectives.MODES`; `allreduce_dtype`: the partial sums'
    dtype on the wire (`collectives.PAYLOADS`); `oneshot_max_bytes`: auto's threshold
    (default: the MI300X spec's)."""
    collectives.check_mode(allreduce)
    collectives.check_payload(allreduce_dtype)
    b = Builder(module.context)
    b.adopt(module)
    report = Report(tp, allreduce, allreduce_dtype, {}, {}, {}, {}, {}, {})
    with module.context, ir.Location.unknown():
        annotate(b, tp)
        old_globals = [op for op in module.body.operations if op.operation.name == "util.global"]
        device_globals: dict = {}  # shared: every entry loads the same per-device globals
        callees: dict = {}  # shared: sharded private functions by argument shardings
        originals = {op.attributes["sym_name"].value for op in module.body.operations
                     if op.operation.name == "util.func"}
        for fn in impl_functions(module):
            name = fn.attributes["halo.entry"].value
            s = Sharder(b, tp, allreduce, allreduce_dtype, oneshot_max_bytes, RULES)
            s.device_globals, s.callees = device_globals, callees
            s.shard_callee = lambda name, shardings, parent=s: shard_callee(b, parent, name,
                                                                            shardings)
            shard_function(b, s, fn)
            (report.transfers[name], report.bytes[name], report.all_reduces[name],
             report.busiest[name], report.modes[name], report.reduced[name]) = s.report
        for g in old_globals:  # every use now loads a per-device copy
            g.operation.erase()
        for key in callees:  # the TP1 callees are replaced by their sharded versions
            op = b.lookup(key[0])
            if op is not None and key[0] in originals:
                op.operation.erase()
        _erase_uncalled(module, {v[0] for v in callees.values()})
        for fn in impl_functions(module):
            name = fn.attributes["halo.entry"].value
            remove_entry(module, name)
            build_entry(b, fn)
            sync, async_ = b.lookup(name), b.lookup(f"{name}$async")
            async_.operation.move_after(fn)  # keep each entry beside its implementation
            sync.operation.move_after(async_)
        if verify:
            verify_placement(module, tp, report.modes)
        if not module.operation.verify():
            raise HaloError("internal error: the sharded module does not verify")
    return report
