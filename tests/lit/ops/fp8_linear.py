# RUN: %python %s | %FileCheck %s
# Tests the fp8 linear: the f16 input is quantized with its 0-d scale (x / rscale, clamped
# to +-240, -0 -> +0, truncf to f8E4M3FNUZ) and handed with the fp8 weight and both scales
# (0-d tensors, never host scalars) to the fp8_matmul kernel, instantiated once.
from lit_util import print_op
from halo_mlir.ops.fp8 import fp8_linear

# CHECK:       util.func private @halo_fp8_matmul_n160_k96_out_dtypef16(%{{.+}}: tensor<?x96xf8E4M3FNUZ>, %{{.+}}: tensor<160x96xf8E4M3FNUZ>, %{{.+}}: tensor<f32>, %{{.+}}: tensor<f32>) -> tensor<?x160xf16>
# CHECK-LABEL: util.func public @fp8_linear(
# CHECK-SAME:    %[[X:.+]]: tensor<4x?x96xf16>, %[[W:.+]]: tensor<160x96xf8E4M3FNUZ>, %[[D:.+]]: tensor<f32>, %[[RS:.+]]: tensor<f32>) -> tensor<4x?x160xf16>
# CHECK:         %[[Q:.+]] = linalg.generic {{.+}} ins(%[[X]], %[[RS]] : tensor<4x?x96xf16>, tensor<f32>) outs(%{{.+}} : tensor<4x?x96xf8E4M3FNUZ>)
# CHECK:           arith.divf
# CHECK:           arith.maximumf %{{.+}}, %{{.+}} : f32
# CHECK:           arith.minimumf %{{.+}}, %{{.+}} : f32
# CHECK:           arith.addf
# CHECK:           arith.truncf %{{.+}} : f32 to f8E4M3FNUZ
# CHECK:         %[[ROWS:.+]] = tensor.collapse_shape %[[Q]] {{\[\[}}0, 1], [2]] : tensor<4x?x96xf8E4M3FNUZ> into tensor<?x96xf8E4M3FNUZ>
# CHECK:         %[[Y:.+]] = util.call @halo_fp8_matmul_n160_k96_out_dtypef16(%[[ROWS]], %[[W]], %[[RS]], %[[D]]) : (tensor<?x96xf8E4M3FNUZ>, tensor<160x96xf8E4M3FNUZ>, tensor<f32>, tensor<f32>) -> tensor<?x160xf16>
# CHECK:         tensor.expand_shape %[[Y]] {{\[\[}}0, 1], [2]] output_shape [4, %{{.+}}, 160]
print_op("fp8_linear", [((4, None, 96), "f16"), ((160, 96), "f8E4M3FNUZ"), ((), "f32"),
                        ((), "f32")],
         lambda b, x, w, d, rs: fp8_linear(b, x, w, d, rs, dtype="f16"))
