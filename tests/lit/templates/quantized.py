# RUN: %python %s q4_1_matmul | %FileCheck %s --check-prefix=Q4
# RUN: %python %s q8_0_matmul | %FileCheck %s --check-prefix=Q8
# RUN: %python %s q8_0_rows | %FileCheck %s --check-prefix=ROWS
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
from iree.compiler import ir

name, text = render(KERNELS[sys.argv[1]], {"n": 96, "k": 64})
with ir.Context():
    module = ir.Module.parse(text)
    assert module.operation.verify()
    print(module)
