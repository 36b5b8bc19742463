"""Public entry points (coarse-fences `$async` + sync wrapper) from an `$impl` function's
metadata, so the emitter and IR passes (which change signatures) build them one way.

Metadata on `@NAME$impl`: `halo.entry = "NAME"`, `halo.inplace` (argument indices whose new
values are returned after the regular results), optional `halo.divisors` (flat triples
arg, dim, k: that dynamic size is a multiple of k), `halo.arg_devices` and
`halo.result_devices` (device per argument / regular result, -1 for none).
"""

from __future__ import annotations

from iree.compiler import ir

from halo_mlir.ir_builder import Builder


def _ints(fn, name: str) -> list[int]:
    return list(ir.DenseI64ArrayAttr(fn.attributes[name])) if name in fn.attributes else []


def impl_functions(module) -> list:
    return [op for op in module.body.operations
            if op.operation.name == "util.func" and "halo.entry" in op.attributes]


def build_entry(b: Builder, impl) -> None:
    name = impl.attributes["halo.entry"].value
    ftype = ir.FunctionType(ir.TypeAttr(impl.attributes["function_type"]).value)
    inplace = _ints(impl, "halo.inplace")
    results = list(ftype.results)[:len(ftype.results) - len(inplace)]
    flat = _ints(impl, "halo.divisors")
    divisors = {(flat[i], flat[i + 1]): flat[i + 2] for i in range(0, len(flat), 3)}
    devices = lambda key, n: [None if d < 0 else d for d in _ints(impl, key)] or None  # noqa
    b.coarse_fences_entry(name, impl.attributes["sym_name"].value, list(ftype.inputs), results,
                          inplace, divisors, devices("halo.arg_devices", len(ftype.inputs)),
                          devices("halo.result_devices", len(results)))


def remove_entry(module, name: str) -> None:
    for op in list(module.body.operations):
        if "sym_name" in op.attributes and op.attributes["sym_name"].value in (name, f"{name}$async"):
            op.operation.erase()
