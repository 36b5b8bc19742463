"""The coarse-fences ABI around an `$impl` function: the public `NAME$async` (what
shortfin calls) and the sync `NAME`. A mixin of `Builder`."""

from __future__ import annotations

from typing import Sequence

from iree.compiler import ir
from iree.compiler.dialects import hal, tensor, util

DYN = ir.ShapedType.get_dynamic_size()


class EntryPoints:
    def coarse_fences_entry(self, name: str, impl: str, arg_types: Sequence[ir.RankedTensorType],
                            result_types: Sequence[ir.RankedTensorType], inplace: Sequence[int],
                            divisors: dict[tuple[int, int], int] | None = None,
                            arg_devices: Sequence[int | None] | None = None,
                            result_devices: Sequence[int | None] | None = None):
        """Public `@name$async` (coarse-fences ABI) and sync `@name` around `@impl`.

        `@impl(args...) -> (results..., new_arg for arg in inplace)`; each such new value
        is aliased onto the caller's buffer of that argument, so the caller sees it updated
        in place (the ABI's `cache_state`). `divisors[(arg, dim)] = k` promises that the
        dynamic size is a multiple of k (`util.assume.int`): gfx942 matmuls with a dynamic M
        get MFMA only with such a hint. `arg_devices`/`result_devices` place each argument
        and result on a device (`#hal.device.promise<@__device_i>`) in multi-device modules.
        """
        with self.at(name):
            self._coarse_fences_entry(name, impl, arg_types, result_types, inplace,
                                      divisors or {}, arg_devices or [None] * len(arg_types),
                                      result_devices or [None] * len(result_types))

    @staticmethod
    def device(i: int | None) -> ir.Attribute | None:
        return None if i is None else ir.Attribute.parse(f"#hal.device.promise<@__device_{i}>")

    def _coarse_fences_entry(self, name, impl, arg_types, result_types, inplace, divisors,
                             arg_devices, result_devices):
        bv = ir.Type.parse("!hal.buffer_view")
        fence = ir.Type.parse("!hal.fence")
        n_args = len(arg_types)
        with self.function(f"{name}$async", [bv] * n_args + [fence, fence],
                           [bv] * len(result_types)) as args:
            fn = args[0].owner.owner
            fn.attributes["iree.abi.model"] = ir.StringAttr.get("coarse-fences")
            fn.attributes["iree.abi.stub"] = ir.UnitAttr.get()
            fn.attributes["inlining_policy"] = ir.Attribute.parse("#util.inline.never")
            # Lets iree-run-module and other reflective callers see the fence arguments.
            fn.attributes["iree.reflection"] = ir.Attribute.parse(
                '{iree.abi.model = "coarse-fences"}')
            wait, signal = args[n_args:]
            tensors, dims = [], []
            for n, (a, t) in enumerate(zip(args, arg_types)):
                d = [self.assume_divisible(hal.buffer_view_dim(a, i), divisors.get((n, i)))
                     for i, s in enumerate(t.shape) if s == DYN]
                # `consume` on in-place arguments: without it IREE 3.13 clones the whole
                # updated cache into a dead buffer on every call.
                tensors.append(hal.tensor_import(t, a, ir.TypeAttr.get(t), d, wait_fence=wait,
                                                 consume=True if n in inplace else None,
                                                 affinity=self.device(arg_devices[n])))
                dims.append(d)
            outs = self.call(impl, tensors, [*result_types, *(arg_types[i] for i in inplace)])
            results, updated = outs[:len(result_types)], outs[len(result_types):]
            live = [hal.tensor_alias(u, dims[i], args[i], wait_fence=wait,
                                     affinity=self.device(arg_devices[i]))
                    for u, i in zip(updated, inplace)]
            ready = hal.tensor_barrier([v.type for v in live + results], live + results, signal)
            ready = [ready] if isinstance(ready, ir.Value) else list(ready)
            exported = []
            for r, dev in zip(ready[len(live):], result_devices):
                t = ir.RankedTensorType(r.type)
                d = [tensor.dim(r, self.index(i)) for i, s in enumerate(t.shape) if s == DYN]
                exported.append(hal.tensor_export(bv, r, ir.TypeAttr.get(t), d,
                                                  affinity=self.device(dev)))
            self.ret(*exported)
        with self.function(name, [bv] * n_args, [bv] * len(result_types)) as args:
            args[0].owner.owner.attributes["iree.abi.stub"] = ir.UnitAttr.get()
            device = hal.devices_get(self.index(0), results=[ir.Type.parse("!hal.device")])
            done = hal.fence_create(device, ir.IntegerAttr.get(self.type("i64"), 0),
                                    results=[fence])
            res = self.call(f"{name}$async", [*args, util.null(fence), done],
                            [bv] * len(result_types))
            hal.fence_await(self.scalar(-1, "i32"), ir.IntegerAttr.get(self.type("i64"), 0),
                            [done], results=[self.type("i32")])
            self.ret(*res)


# ---- entry points from metadata ----------------------------------------------------
# Public entry points (coarse-fences `$async` + sync wrapper) from an `$impl` function's
# metadata, so the emitter and IR passes (which change signatures) build them one way.
#
# Metadata on `@NAME$impl`: `halo.entry = "NAME"`, `halo.inplace` (argument indices whose new
# values are returned after the regular results), optional `halo.divisors` (flat triples
# arg, dim, k: that dynamic size is a multiple of k), `halo.arg_devices` and
# `halo.result_devices` (device per argument / regular result, -1 for none).



def _ints(fn, name: str) -> list[int]:
    return list(ir.DenseI64ArrayAttr(fn.attributes[name])) if name in fn.attributes else []


def impl_functions(module) -> list:
    return [op for op in module.body.operations
            if op.operation.name == "util.func" and "halo.entry" in op.attributes]


def build_entry(b, impl) -> None:
    """The public entry points of `impl` (an `$impl` util.func with `halo.entry` metadata,
    described at the end of this file) built with the Builder `b`."""
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
