# RUN: %python %s | %FileCheck %s
# Tests that a linear layer is one transposed-B linalg.matmul accumulating f16 inputs in f32,
# on the flattened rows, truncated back to f16.
from lit_util import print_op
from halo_mlir.ops.linear import linear

# CHECK-DAG: #[[LHS:.+]] = affine_map<(d0, d1, d2) -> (d0, d2)>
# CHECK-DAG: #[[RHS:.+]] = affine_map<(d0, d1, d2) -> (d1, d2)>
# CHECK-DAG: #[[OUT:.+]] = affine_map<(d0, d1, d2) -> (d0, d1)>
# CHECK-LABEL: util.func public @linear(
# CHECK-SAME:    %[[X:.+]]: tensor<4x?x96xf16>, %[[W:.+]]: tensor<160x96xf16>) -> tensor<4x?x160xf16>
# CHECK:         %[[ROWS:.+]] = tensor.collapse_shape %[[X]] {{\[\[}}0, 1], [2]] : tensor<4x?x96xf16> into tensor<?x96xf16>
# CHECK:         %[[ACC:.+]] = linalg.fill ins(%{{.+}} : f32) outs(%{{.+}} : tensor<?x160xf32>)
# CHECK:         %[[MM:.+]] = linalg.matmul indexing_maps = [#[[LHS]], #[[RHS]], #[[OUT]]]
# CHECK-SAME:      ins(%[[ROWS]], %[[W]] : tensor<?x96xf16>, tensor<160x96xf16>) outs(%[[ACC]] : tensor<?x160xf32>)
# CHECK:         %[[TRUNC:.+]] = linalg.generic {{.+}} ins(%[[MM]] : tensor<?x160xf32>)
# CHECK:           arith.truncf %{{.+}} : f32 to f16
# CHECK:         tensor.expand_shape %[[TRUNC]] {{\[\[}}0, 1], [2]] output_shape [4, %{{.+}}, 160]
print_op("linear", [((4, None, 96), "f16"), ((160, 96), "f16")],
         lambda b, x, w: linear(b, x, w, dtype="f16"))
