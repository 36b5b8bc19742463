# RUN: %python %s | %FileCheck %s
# Tests that RMSNorm reduces x^2 in f32 and normalizes and scales in f32 before truncating.
from lit_util import print_op
from halo_mlir.ops.norm import rmsnorm

# CHECK-LABEL: util.func public @rmsnorm(
# CHECK-SAME:    %[[X:.+]]: tensor<2x?x64xf16>, %[[W:.+]]: tensor<64xf16>) -> tensor<2x?x64xf16>
# CHECK:         %[[ZERO:.+]] = linalg.fill ins(%{{.+}} : f32) outs(%{{.+}} : tensor<2x?xf32>)
# CHECK:         %[[SUMSQ:.+]] = linalg.generic
# CHECK-SAME:      iterator_types = ["parallel", "parallel", "reduction"]
# CHECK-SAME:      ins(%[[X]] : tensor<2x?x64xf16>) outs(%[[ZERO]] : tensor<2x?xf32>)
# CHECK:           arith.extf %{{.+}} : f16 to f32
# CHECK:         %[[INV_D:.+]] = arith.constant 1.562500e-02 : f32
# CHECK:         %[[EPS:.+]] = arith.constant 9.99999974E-6 : f32
# CHECK:         linalg.generic
# CHECK-SAME:      ins(%[[X]], %[[SUMSQ]], %[[W]] : tensor<2x?x64xf16>, tensor<2x?xf32>, tensor<64xf16>)
# CHECK:           arith.mulf %{{.+}}, %[[INV_D]] : f32
# CHECK:           arith.addf %{{.+}}, %[[EPS]] : f32
# CHECK:           math.rsqrt
# CHECK:           arith.truncf %{{.+}} : f32 to f16
print_op("rmsnorm", [((2, None, 64), "f16"), ((64,), "f16")],
         lambda b, x, w: rmsnorm(b, x, w, eps=1e-5, dtype="f16"))
