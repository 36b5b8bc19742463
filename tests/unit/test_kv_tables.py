"""Decode's gather rows for every layer, computed once per step (`kv_cache.decode_tables`),
compiled for CPU and checked against the rows written out by hand; a layer's slice
(`layer_rows`) is that layer's rows."""

import numpy as np

LAYERS, STRIDE = 3, 8


def _compile_tables():
    import iree.compiler as ic
    import iree.runtime as rt

    from halo_mlir.ir_builder import Builder
    from halo_mlir.ops import kv_cache as kv

    b = Builder()
    with b.context, b.at("tables"):
        module = b.new_module()
        types = [b.tensor_type((2, None), "i64"), b.tensor_type((2,), "i64")]

        def body(pages, positions):
            read, write = kv.decode_tables(b, pages, positions, LAYERS, STRIDE)
            layer = b.barrier(b.scalar(2, "i64"))
            return (read, write, kv.layer_rows(b, read, layer, 1),
                    kv.layer_rows(b, write, layer))
        b.define("tables", types, body)
        text = str(module)
    vmfb = ic.compile_str(text, target_backends=["llvm-cpu"],
                          extra_args=["--iree-llvmcpu-target-cpu=generic"])
    ctx = rt.SystemContext(config=rt.Config("local-sync"))
    ctx.add_vm_module(rt.VmModule.copy_buffer(ctx.instance, vmfb))
    return ctx.modules.module.tables


def test_decode_tables_hold_every_layers_rows():
    pages = np.array([[5, 7, 9], [1, 2, 3]], np.int64)
    positions = np.array([10, 17], np.int64)  # pages 1 and 2 of their rows
    read, write, v_rows_2, write_2 = (np.asarray(x.to_host())
                                      for x in _compile_tables()(pages, positions))
    want_read = np.zeros((LAYERS, 2, 2, 3, 3), np.int64)
    want_write = np.zeros((LAYERS, 2, 1, 2), np.int64)
    for layer in range(LAYERS):
        for kv in range(2):
            want_read[layer, kv, ..., 0] = pages
            want_read[layer, kv, ..., 1] = layer
            want_read[layer, kv, ..., 2] = kv
        want_write[layer, :, 0, 0] = [pages[n, positions[n] // STRIDE] for n in range(2)]
        want_write[layer, :, 0, 1] = layer
    np.testing.assert_array_equal(read, want_read)
    np.testing.assert_array_equal(write, want_write)
    np.testing.assert_array_equal(v_rows_2, want_read[2, 1])
    np.testing.assert_array_equal(write_2, want_write[2])
