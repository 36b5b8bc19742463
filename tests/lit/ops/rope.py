# RUN: %python %s | %FileCheck %s
# Tests that RoPE splits each head in halves (HF rotate_half), rotates in f32 with
# angle = position * inv_freq, and keeps the llama3-scaled frequencies as a constant.

from lit_util import print_op
from halo_mlir.ops.rope import inv_freq, rope

# CHECK-LABEL: util.func public @rope(
# CHECK-SAME:    %[[X:.+]]: tensor<2x?x6x16xf16>, %[[POS:.+]]: tensor<2x?xi64>) -> tensor<2x?x6x16xf16>
# CHECK:         %[[FREQS:.+]] = arith.constant dense<[1.000000e+00, {{.+}}]> : tensor<8xf32>
# CHECK:         %[[PAIRS:.+]] = tensor.expand_shape %[[X]] {{\[\[}}0], [1], [2], [3, 4]] {{.+}} into tensor<2x?x6x2x8xf16>
# CHECK:         %[[X1:.+]] = tensor.extract_slice %[[PAIRS]][0, 0, 0, 0, 0]
# CHECK:         %[[X2:.+]] = tensor.extract_slice %[[PAIRS]][0, 0, 0, 1, 0]
# CHECK:         linalg.generic
# CHECK-SAME:      ins(%[[PAIRS]], %{{.+}}, %{{.+}}, %[[POS]], %[[FREQS]] :
# CHECK:           %[[FIRST:.+]] = arith.cmpi eq, %{{.+}}, %c0
# CHECK:           %[[NEG_X2:.+]] = arith.negf
# CHECK:           %[[ROT:.+]] = arith.select %[[FIRST]], %[[NEG_X2]], %{{.+}} : f32
# CHECK:           %[[ANGLE:.+]] = arith.mulf %{{.+}}, %{{.+}} : f32
# CHECK-DAG:       math.cos %[[ANGLE]]
# CHECK-DAG:       math.sin %[[ANGLE]]
# CHECK:           arith.truncf
# CHECK:         tensor.collapse_shape %{{.+}} {{\[\[}}0], [1], [2], [3, 4]] : tensor<2x?x6x2x8xf16> into tensor<2x?x6x16xf16>
freqs = inv_freq(16, 500000.0, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 64})
print_op("rope", [((2, None, 6, 16), "f16"), ((2, None), "i64")],
         lambda b, x, p: rope(b, x, p, b.dense(freqs, "f32"), dtype="f16"))
