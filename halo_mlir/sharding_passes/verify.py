"""Placement verifier, run after the sharding pass: an inconsistent module is an error at
emit time rather than an obscure compiler failure later (IREE issue 21084).

Checks, per entry function:
- every `#hal.device.promise<@__device_i>` names one of the `tp` devices compiled for;
- every op's tensor operands (including values its regions capture) live on one device:
  placement flows from arguments (`halo.arg_devices`), per-device globals
  (`stream.affinity`) and `flow.tensor.transfer` targets;
- the number of transfers is what the plan predicts: 2(N-1)N per ring all-reduce or
  2(N-1) per star all-reduce (one all-reduce per row-split weight use), N-1 per replicated
  argument, N-1 for the vocab-split logits gathered to device 0.
"""

from __future__ import annotations

import re

from iree.compiler import ir

from halo_mlir.errors import HaloError
from halo_mlir.ir_builder import walk_nested
from halo_mlir.model.entry import impl_functions

_PROMISE = re.compile(r"#hal\.device\.promise<@(\w+)>")


def _device(attr) -> int | None:
    m = _PROMISE.search(str(attr))
    return int(m.group(1).rsplit("_", 1)[1]) if m else None


def _ints(fn, name):
    return list(ir.DenseI64ArrayAttr(fn.attributes[name])) if name in fn.attributes else []


def _where(op) -> str:
    return f"{op.name} at {op.location}"


def verify_placement(module, tp: int, allreduce: str | None = None) -> dict:
    """Raises HaloError on the first inconsistency; returns {entry: transfer count}."""
    declared = {f"__device_{i}" for i in range(tp)}
    for name in set(_PROMISE.findall(str(module))):
        if name not in declared:
            raise HaloError(f"the module promises device @{name}, but only {tp} devices "
                            f"(__device_0..{tp - 1}) are declared")
    global_device = {}
    global_split = {}
    for op in module.body.operations:
        if op.operation.name == "util.global":
            sym = op.attributes["sym_name"].value
            if "stream.affinity" in op.attributes:
                global_device[sym] = _device(op.attributes["stream.affinity"])
            global_split[sym] = ".shard." in sym
    counts = {}
    for fn in impl_functions(module):
        entry = fn.attributes["halo.entry"].value
        where: dict = {}
        block = fn.regions[0].blocks[0]
        for arg, dev in zip(block.arguments, _ints(fn, "halo.arg_devices")):
            where[arg] = None if dev < 0 else dev
        transfers = row_split_loads = 0
        gathered_logits = False
        for op in block.operations:
            o = op.operation
            if o.name == "flow.tensor.transfer":
                transfers += 1
                dev = _device(o.attributes["target"])
            elif o.name == "util.global.load":
                sym = ir.FlatSymbolRefAttr(o.attributes["global"]).value
                dev = global_device.get(sym)
                if dev is None:
                    raise HaloError(f"{_where(o)}: global @{sym} has no device (stream.affinity)")
                if ".shard." in sym and any(k in sym for k in ("attn_output", "ffn_down")):
                    row_split_loads += 1
                gathered_logits = gathered_logits or sym.startswith("output.weight.shard.")
            elif o.name == "util.return":  # results stay where they are (one per device)
                continue
            else:
                devs = {where.get(v) for v in _operands(o)} - {None}
                if len(devs) > 1:
                    raise HaloError(f"{_where(o)}: operands live on devices {sorted(devs)}; "
                                    "a flow.tensor.transfer is missing")
                dev = devs.pop() if devs else None
            for r in o.results:
                where[r] = dev
        if allreduce:
            per = 2 * (tp - 1) * tp if allreduce == "ring" else 2 * (tp - 1)
            devs = _ints(fn, "halo.arg_devices")
            groups = sum(1 for d in devs if d != 0) // max(tp - 1, 1)
            replicated_args = len(devs) - groups * tp
            predicted = ((row_split_loads // tp) * per
                         + (replicated_args + int(gathered_logits)) * (tp - 1))
            if transfers != predicted:
                raise HaloError(f"{entry}: {transfers} transfers, the plan predicts {predicted}")
        counts[entry] = transfers
    return counts


def _operands(op) -> list:
    """Operands of `op` and of everything nested in it (values its regions capture)."""
    vals = list(op.operands)
    if not len(op.regions):
        return vals

    walk_nested(op, lambda inner: vals.extend(inner.operands))
    return vals
