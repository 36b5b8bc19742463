# RUN: %python %s | %FileCheck %s
# Tests that SwiGLU is gate and up projections, silu(gate) * up in f32, then the down projection.
from lit_util import print_op
from halo_mlir.ops.ffn import ffn

# CHECK-LABEL: util.func public @ffn(
# CHECK-SAME:    %[[X:.+]]: tensor<1x?x32xf32>, %[[GATE:.+]]: tensor<48x32xf32>, %[[UP:.+]]: tensor<48x32xf32>, %[[DOWN:.+]]: tensor<32x48xf32>)
# CHECK:         linalg.matmul {{.+}} ins(%{{.+}}, %[[GATE]] :
# CHECK:         linalg.matmul {{.+}} ins(%{{.+}}, %[[UP]] :
# CHECK:         linalg.generic
# CHECK:           %[[NEG:.+]] = arith.negf
# CHECK:           %[[EXP:.+]] = math.exp %[[NEG]]
# CHECK:           %[[DEN:.+]] = arith.addf %{{.+}}, %[[EXP]]
# CHECK:           %[[SILU:.+]] = arith.divf %{{.+}}, %[[DEN]]
# CHECK:           arith.mulf %[[SILU]], %{{.+}} : f32
# CHECK:         linalg.matmul {{.+}} ins(%{{.+}}, %[[DOWN]] :
print_op("ffn", [((1, None, 32), "f32"), ((48, 32), "f32"), ((48, 32), "f32"), ((32, 48), "f32")],
         lambda b, x, g, u, d: ffn(b, x, g, u, d, dtype="f32"))
