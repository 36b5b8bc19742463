# RUN: %python %s | %FileCheck %s
# Tests the fp8 linear with per-channel weight scales: a [out] f32 scale picks the
# fp8_matmul_rows kernel (the epilogue reads d_rows[n]), the input quantized as for
# per-tensor scales.
from lit_util import print_op
from halo_mlir.ops.fp8 import fp8_linear

# CHECK:       util.func private @halo_fp8_matmul_rows_n160_k96_out_dtypef16(%{{.+}}: tensor<?x96xf8E4M3FNUZ>, %{{.+}}: tensor<160x96xf8E4M3FNUZ>, %{{.+}}: tensor<f32>, %{{.+}}: tensor<160xf32>) -> tensor<?x160xf16>
# CHECK:         linalg.generic {indexing_maps = [#{{.+}}, #{{.+}}, #[[ROW:.+]], #{{.+}}]
# CHECK-LABEL: util.func public @fp8_linear(
# CHECK-SAME:    %[[X:.+]]: tensor<4x?x96xf16>, %[[W:.+]]: tensor<160x96xf8E4M3FNUZ>, %[[D:.+]]: tensor<160xf32>, %[[RS:.+]]: tensor<f32>) -> tensor<4x?x160xf16>
# CHECK:         %[[Q:.+]] = linalg.generic {{.+}} ins(%[[X]], %[[RS]] : tensor<4x?x96xf16>, tensor<f32>)
# CHECK:         %[[ROWS:.+]] = tensor.collapse_shape %[[Q]]
# CHECK:         util.call @halo_fp8_matmul_rows_n160_k96_out_dtypef16(%[[ROWS]], %[[W]], %[[RS]], %[[D]]) : (tensor<?x96xf8E4M3FNUZ>, tensor<160x96xf8E4M3FNUZ>, tensor<f32>, tensor<160xf32>) -> tensor<?x160xf16>
print_op("fp8_linear", [((4, None, 96), "f16"), ((160, 96), "f8E4M3FNUZ"), ((160,), "f32"),
                        ((), "f32")],
         lambda b, x, w, d, rs: fp8_linear(b, x, w, d, rs, dtype="f16"))
