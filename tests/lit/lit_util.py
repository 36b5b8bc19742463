"""Shared by the op tests: build one function around an op and print it."""

from halo_mlir.ir_builder import Builder


def print_op(name, arg_specs, body):
    """arg_specs: [(shape with None for dynamic, dtype)]; body(b, *args) -> value(s)."""
    b = Builder()
    with b.context, b.at(name):
        module = b.new_module()
        types = [b.tensor_type(shape, dtype) for shape, dtype in arg_specs]
        b.define(name, types, lambda *args: body(b, *args))
        assert module.operation.verify()
        print(module)


def print_kernel(argv):
    """`NAME k=v ...` -> the kernel's rendered module, parsed, verified and printed."""
    from iree.compiler import ir

    from halo_mlir.kernels import KERNELS, render

    name = argv[0]
    values = {k: (int(v) if v.isdigit() else v) for k, v in (a.split("=") for a in argv[1:])}
    _, text = render(KERNELS[name], values)
    with ir.Context():
        module = ir.Module.parse(text)
        assert module.operation.verify()
        print(module)
