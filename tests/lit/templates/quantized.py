# RUN: %python %s q4_1_matmul 64 | %FileCheck %s --check-prefix=Q4
# RUN: %python %s q8_0_matmul 64 | %FileCheck %s --check-prefix=Q8
# RUN: %python %s q8_0_rows 64 | %FileCheck %s --check-prefix=ROWS
# RUN: %python %s q4_k_matmul 512 | %FileCheck %s --check-prefix=Q4K
# RUN: %python %s q6_k_matmul 512 | %FileCheck %s --check-prefix=Q6K
# RUN: %python %s q4_k_rows 512 | %FileCheck %s --check-prefix=Q4KROWS
# RUN: %python %s q6_k_rows 512 | %FileCheck %s --check-prefix=Q6KROWS
# Tests that the quantized kernels render into functions with mangled names, dequantize
# inside the contraction (f32 accumulation) and index blocks without materializing weights.
import sys

from halo_mlir.kernels import KERNELS, render

# Q4-LABEL: util.func private @halo_q4_1_matmul_n96_k64(
# Q4-SAME:    %[[X:.+]]: tensor<?x64xf32>, %[[D:.+]]: tensor<96x2xf16>, %[[M:.+]]: tensor<96x2xf16>, %[[QS:.+]]: tensor<96x2x16xi8>) -> tensor<?x96xf32>
# Q4:         %[[XB:.+]] = tensor.expand_shape %[[X]] {{\[\[}}0], [1, 2, 3]] output_shape [%{{.+}}, 2, 2, 16]
# Q4:         linalg.generic
# Q4-SAME:      iterator_types = ["parallel", "parallel", "reduction", "reduction", "reduction"]
# Q4-SAME:      ins(%[[XB]], %[[D]], %[[M]], %[[QS]] :
# Q4:           %[[SHIFTED:.+]] = arith.shrui
# Q4:           %[[NIBBLE:.+]] = arith.andi %[[SHIFTED]], %{{.+}} : i8
# Q4:           arith.uitofp %[[NIBBLE]] : i8 to f32

# Q8-LABEL: util.func private @halo_q8_0_matmul_n96_k64(
# Q8-SAME:    tensor<?x64xf32>, %{{.+}}: tensor<96x2xf16>, %{{.+}}: tensor<96x2x32xi8>) -> tensor<?x96xf32>
# Q8:         arith.sitofp %{{.+}} : i8 to f32

# ROWS-LABEL: util.func private @halo_q8_0_rows_n96_k64(
# ROWS-SAME:    %[[IDS:.+]]: tensor<?xi64>, %[[D:.+]]: tensor<96x2xf16>, %[[QS:.+]]: tensor<96x2x32xi8>) -> tensor<?x64xf32>
# ROWS:         tensor.extract %[[QS]]
# ROWS:         tensor.extract %[[D]]

# Q4_K: the unpacked 6-bit scales and mins [N, K/256, 8] are viewed [N, K/256, 4, 2] so the
# sub-block (j, h) indexes them by projection; the super-block's scale products are f32.
# Q4K-LABEL: util.func private @halo_q4_k_matmul_n96_k512(
# Q4K-SAME:    %[[X:.+]]: tensor<?x512xf32>, %[[D:.+]]: tensor<96x2xf16>, %[[DMIN:.+]]: tensor<96x2xf16>, %[[SC:.+]]: tensor<96x2x8xi8>, %[[M:.+]]: tensor<96x2x8xi8>, %[[QS:.+]]: tensor<96x2x4x32xi8>) -> tensor<?x96xf32>
# Q4K:         %[[XB:.+]] = tensor.expand_shape %[[X]] {{\[\[}}0], [1, 2, 3, 4]] output_shape [%{{.+}}, 2, 4, 2, 32]
# Q4K:         %[[SCB:.+]] = tensor.expand_shape %[[SC]] {{\[\[}}0], [1], [2, 3]] output_shape [96, 2, 4, 2]
# Q4K:         %[[MB:.+]] = tensor.expand_shape %[[M]] {{\[\[}}0], [1], [2, 3]] output_shape [96, 2, 4, 2]
# Q4K:         linalg.generic
# Q4K-SAME:      iterator_types = ["parallel", "parallel", "reduction", "reduction", "reduction", "reduction"]
# Q4K-SAME:      ins(%[[XB]], %[[D]], %[[DMIN]], %[[SCB]], %[[MB]], %[[QS]] :
# Q4K:           %[[NIBBLE:.+]] = arith.andi %{{.+}}, %{{.+}} : i8
# Q4K:           %[[Q:.+]] = arith.uitofp %[[NIBBLE]] : i8 to f32
# Q4K:           %[[SCALE:.+]] = arith.mulf %{{.+}}, %{{.+}} : f32
# Q4K:           %[[OFFSET:.+]] = arith.mulf %{{.+}}, %{{.+}} : f32
# Q4K:           %[[SCALED:.+]] = arith.mulf %[[SCALE]], %[[Q]] : f32
# Q4K:           %[[W:.+]] = arith.subf %[[SCALED]], %[[OFFSET]] : f32
# Q4K:           arith.mulf %{{.+}}, %[[W]] : f32
# Q4K-NOT:     tensor.extract

# Q6_K: low nibbles, 2-bit highs and 16-element scales each indexed by projection.
# Q6K-DAG:   #[[SCMAP:map[0-9]*]] = affine_map<(d0, d1, d2, d3, d4, d5, d6, d7) -> (d1, d2, d3, d4, d5, d6)>
# Q6K-DAG:   #[[QLMAP:map[0-9]*]] = affine_map<(d0, d1, d2, d3, d4, d5, d6, d7) -> (d1, d2, d3, d5, d6, d7)>
# Q6K-DAG:   #[[QHMAP:map[0-9]*]] = affine_map<(d0, d1, d2, d3, d4, d5, d6, d7) -> (d1, d2, d3, d6, d7)>
# Q6K-LABEL: util.func private @halo_q6_k_matmul_n96_k512(
# Q6K-SAME:    %[[X:.+]]: tensor<?x512xf32>, %[[D:.+]]: tensor<96x2xf16>, %[[SC:.+]]: tensor<96x2x16xi8>, %[[QL:.+]]: tensor<96x2x2x64xi8>, %[[QH:.+]]: tensor<96x2x2x32xi8>) -> tensor<?x96xf32>
# Q6K:         %[[XB:.+]] = tensor.expand_shape %[[X]] {{.+}} output_shape [%{{.+}}, 2, 2, 2, 2, 2, 16]
# Q6K:         linalg.generic
# Q6K-SAME:      #[[SCMAP]], #[[QLMAP]], #[[QHMAP]],
# Q6K-SAME:      ins(%[[XB]], %[[D]], %{{.+}}, %{{.+}}, %{{.+}} :
# Q6K:           %[[HIGH:.+]] = arith.shli %{{.+}}, %{{.+}} : i8
# Q6K:           %[[Q:.+]] = arith.ori %{{.+}}, %[[HIGH]] : i8
# Q6K:           %[[CENTRED:.+]] = arith.subi %[[Q]], %{{.+}} : i8
# Q6K:           arith.sitofp %[[CENTRED]] : i8 to f32

# Q4KROWS-LABEL: util.func private @halo_q4_k_rows_n96_k512(
# Q4KROWS-SAME:    %[[IDS:.+]]: tensor<?xi64>, %[[D:.+]]: tensor<96x2xf16>, %[[DMIN:.+]]: tensor<96x2xf16>, %[[SC:.+]]: tensor<96x2x8xi8>, %[[M:.+]]: tensor<96x2x8xi8>, %[[QS:.+]]: tensor<96x2x4x32xi8>) -> tensor<?x512xf32>
# Q4KROWS:         tensor.extract %[[QS]]
# Q4KROWS:         tensor.extract %[[D]]
# Q4KROWS:         tensor.extract %[[DMIN]]
# Q4KROWS:         tensor.extract %[[SC]]
# Q4KROWS:         tensor.extract %[[M]]

# Q6KROWS-LABEL: util.func private @halo_q6_k_rows_n96_k512(
# Q6KROWS-SAME:    %[[IDS:.+]]: tensor<?xi64>, %[[D:.+]]: tensor<96x2xf16>, %[[SC:.+]]: tensor<96x2x16xi8>, %[[QL:.+]]: tensor<96x2x2x64xi8>, %[[QH:.+]]: tensor<96x2x2x32xi8>) -> tensor<?x512xf32>
# Q6KROWS:         tensor.extract %[[QL]]
# Q6KROWS:         tensor.extract %[[QH]]
# Q6KROWS:         tensor.extract %[[SC]]
# Q6KROWS:         tensor.extract %[[D]]
from iree.compiler import ir

name, text = render(KERNELS[sys.argv[1]], {"n": 96, "k": int(sys.argv[2])})
with ir.Context():
    module = ir.Module.parse(text)
    assert module.operation.verify()
    print(module)
