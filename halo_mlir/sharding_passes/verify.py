"""Placement verifier, run after the sharding pass: an inconsistent module is an error at
emit time rather than an obscure compiler failure later (IREE issue 21084).

Checks, per entry function:
- every `#hal.device.promise<@__device_i>` names one of the `tp` devices compiled for;
- every op's tensor operands (including values its regions capture) live on one device:
  placement flows from arguments (`halo.arg_devices`), per-device globals
  (`stream.affinity`) and `flow.tensor.transfer` targets;
- calls pass each argument on the device the (sharded) callee expects it;
- the number of transfers executed (a callee's counted once per call) is what the plan
  predicts: one all-reduce per row-split weight use, each N(N-1) transfers one-shot,
  2N(N-1) reduce-scatter + all-gather, 2(N-1) star (`collectives.TRANSFERS`); N-1 per
  replicated argument; N-1 for the vocab-split logits gathered to device 0.
"""

from __future__ import annotations

import re

from iree.compiler import ir

from halo_mlir.errors import HaloError
from halo_mlir.ir_builder import is_empty_tensor, walk_nested
from halo_mlir.ir_builder.entry_points import impl_functions
from halo_mlir.sharding_passes.collectives import TRANSFERS

_PROMISE = re.compile(r"#hal\.device\.promise<@(\w+)>")


def _device_of(attr) -> int | None:
    m = _PROMISE.search(str(attr))
    return int(m.group(1).rsplit("_", 1)[1]) if m else None


def _ints(fn, name):
    return list(ir.DenseI64ArrayAttr(fn.attributes[name])) if name in fn.attributes else []


def _where(op) -> str:
    return f"{op.name} at {op.location}"


def verify_placement(module, tp: int, allreduce: str | dict | None = None) -> dict:
    """Raises HaloError on the first inconsistency; returns {entry: transfer count}.
    `allreduce`: the all-reduce mode of every entry, or {entry: {mode: all-reduces}} (what
    `auto` chose, from the sharding pass's report); None skips the transfer count."""
    # Attributes are uniqued: a TP8 module repeats 8 promises thousands of times, so each
    # distinct one is printed and parsed once.
    devices: dict = {}

    def _device(attr) -> int | None:
        if attr not in devices:
            devices[attr] = _device_of(attr)
        return devices[attr]

    declared = {f"__device_{i}" for i in range(tp)}
    for name in _promised_devices(module):
        if name not in declared:
            raise HaloError(f"the module promises device @{name}, but only {tp} devices "
                            f"(__device_0..{tp - 1}) are declared")
    global_device = {}
    global_split = {}
    global_layers = {}
    for op in module.body.operations:
        if op.operation.name == "util.global":
            sym = op.attributes["sym_name"].value
            if "stream.affinity" in op.attributes:
                global_device[sym] = _device(op.attributes["stream.affinity"])
            global_split[sym] = ".shard." in sym
            if ".stacked" in sym:
                global_layers[sym] = ir.RankedTensorType(
                    ir.TypeAttr(op.attributes["type"]).value).shape[0]
    functions = {op.attributes["sym_name"].value: op for op in module.body.operations
                 if op.operation.name == "util.func" and "halo.arg_devices" in op.attributes}
    executed: dict[str, int] = {}  # transfers one call of a function performs

    def check(name: str) -> int:
        if name in executed:
            return executed[name]
        fn = functions[name]
        where: dict = {}
        block = fn.regions[0].blocks[0]
        for arg, dev in zip(block.arguments, _ints(fn, "halo.arg_devices")):
            where[arg] = None if dev < 0 else dev
        executed[name] = run(block, where)
        return executed[name]

    def run(block, where: dict) -> int:
        """Place every value of `block`; returns the transfers one pass over it executes."""
        transfers = 0
        for op in block.operations:
            o = op.operation
            if o.name == "flow.tensor.transfer":
                # an empty tensor (a loop accumulator's start) moves no data
                transfers += not is_empty_tensor(o.operands[0])
                devs = [_device(o.attributes["target"])]
            elif o.name == "flow.tensor.barrier":
                have, want = where.get(o.operands[0]), _device(o.attributes["target"])
                if have is not None and have != want:
                    raise HaloError(f"{_where(o)}: pins to device {want} a value that lives "
                                    f"on device {have}")
                devs = [want]
            elif o.name == "util.global.load":
                sym = ir.FlatSymbolRefAttr(o.attributes["global"]).value
                dev = global_device.get(sym)
                if dev is None:
                    raise HaloError(f"{_where(o)}: global @{sym} has no device (stream.affinity)")
                devs = [dev]
            elif o.name in ("util.return", "scf.yield"):  # results stay where they are
                continue
            elif o.name == "scf.for":  # carried values keep their device through the body
                body = o.regions[0].blocks[0]
                inits = list(o.operands)[3:]
                where[body.arguments[0]] = None
                for arg, v in zip(list(body.arguments)[1:], inits):
                    where[arg] = where.get(v)
                trips = _constant(o.operands[1]) - _constant(o.operands[0])
                transfers += trips * run(body, where)
                yielded = list(body.operations)[-1].operands
                devs = []
                for k, (v, init) in enumerate(zip(yielded, inits)):
                    have, back = where.get(init), where.get(v)
                    if None not in (have, back) and have != back:
                        raise HaloError(f"{_where(o)}: carried value {k} enters on device "
                                        f"{have} and comes back on {back}")
                    devs.append(back if have is None else have)
            elif o.name == "util.call":
                callee = ir.FlatSymbolRefAttr(o.attributes["callee"]).value
                if callee not in functions:
                    raise HaloError(f"{_where(o)}: calls @{callee}, which has no placement")
                wanted = _ints(functions[callee], "halo.arg_devices")
                for k, (v, want) in enumerate(zip(o.operands, wanted)):
                    have = where.get(v)
                    if have is not None and have != want:
                        raise HaloError(f"{_where(o)}: argument {k} lives on device {have}, "
                                        f"@{callee} expects device {want}")
                transfers += check(callee)
                devs = [None if d < 0 else d
                        for d in _ints(functions[callee], "halo.result_devices")]
            else:
                found = {where.get(v) for v in _operands(o)} - {None}
                if len(found) > 1:
                    raise HaloError(f"{_where(o)}: operands live on devices {sorted(found)}; "
                                    "a flow.tensor.transfer is missing")
                devs = [found.pop() if found else None] * len(o.results)
            for r, dev in zip(o.results, devs):
                where[r] = dev
        return transfers

    counts = {}
    for fn in impl_functions(module):
        entry = fn.attributes["halo.entry"].value
        transfers = check(fn.attributes["sym_name"].value)
        if allreduce:
            loads = [ir.FlatSymbolRefAttr(op.attributes["global"]).value
                     for op in fn.regions[0].blocks[0].operations
                     if op.operation.name == "util.global.load"]
            # A stacked weight [layers, ...] is used once per layer; a kept-quantized one
            # (`KEY:FIELD.shard.i` per field) once for all its fields.
            weights = {sym.split(":")[0] + sym[sym.index(".shard."):]: sym for sym in loads
                       if ".shard." in sym and any(k in sym for k in ("attn_output", "ffn_down"))}
            row_split = sum(global_layers.get(sym, 1) for sym in weights.values())
            gathered_logits = any(sym.startswith(("output.weight.shard.", "output.weight:"))
                                  and ".shard." in sym for sym in loads)
            modes = allreduce.get(entry, {}) if isinstance(allreduce, dict) \
                else {allreduce: row_split // tp}
            if sum(modes.values()) != row_split // tp or not set(modes) <= set(TRANSFERS):
                raise HaloError(f"{entry}: all-reduces {modes}, the plan predicts "
                                f"{row_split // tp} (one per row-split weight use)")
            devs = _ints(fn, "halo.arg_devices")
            groups = sum(1 for d in devs if d != 0) // max(tp - 1, 1)
            replicated_args = len(devs) - groups * tp
            predicted = (sum(n * TRANSFERS[m](tp) for m, n in modes.items())
                         + (replicated_args + int(gathered_logits)) * (tp - 1))
            if transfers != predicted:
                raise HaloError(f"{entry}: {transfers} transfers, the plan predicts {predicted}")
        counts[entry] = transfers
    return counts


def _promised_devices(module) -> set[str]:
    """The device names of every `#hal.device.promise` attribute in `module`, found by
    walking the ops' attributes (and the arrays and dictionaries inside them) rather than
    printing the module: a TP8 module of several MB prints in about as long as the rest of
    the verification takes."""
    with module.context:
        promise = ir.Attribute.parse("#hal.device.promise<@__device_0>").typeid
    containers = {ir.ArrayAttr.static_typeid: lambda a: ir.ArrayAttr(a),
                  ir.DictAttr.static_typeid: lambda a: [n.attr for n in ir.DictAttr(a)]}
    found: set[str] = set()
    seen: set = set()  # attributes are uniqued: each distinct one is looked into once

    def visit_attr(attr):
        if attr in seen:
            return
        seen.add(attr)
        tid = attr.typeid
        if tid == promise:
            found.update(_PROMISE.findall(str(attr)))
        elif tid in containers:
            for inner in containers[tid](attr):
                visit_attr(inner)

    def visit(op):
        attrs = op.attributes
        for k in range(len(attrs)):
            visit_attr(attrs[k].attr)
        return ir.WalkResult.ADVANCE
    module.operation.walk(visit)
    return found


def _constant(v) -> int:
    if v.owner.name != "arith.constant":
        raise HaloError(f"scf.for at {v.owner.location}: loop bounds must be constants")
    return ir.IntegerAttr(v.owner.attributes["value"]).value


def _operands(op) -> list:
    """Operands of `op` and of everything nested in it (values its regions capture)."""
    vals = list(op.operands)
    if not len(op.regions):
        return vals

    walk_nested(op, lambda inner: vals.extend(inner.operands))
    return vals
