# RUN: %python %s | %FileCheck %s
# Tests that RoPE splits each head in halves (HF rotate_half) and rotates in f32 by the
# angles' cos and sin, computed once per call (`rope_table`: position * inv_freq, the
# llama3-scaled frequencies a constant); and that the halves are read through indexing maps
# with a constant pair index, not sliced out of x (slices of a matmul result become copy
# dispatches of their own).

from lit_util import print_op
from halo_mlir.config import inv_freq
from halo_mlir.ops.rope import rope, rope_table

# CHECK-DAG:   #[[ALL:.+]] = affine_map<(d0, d1, d2, d3, d4) -> (d0, d1, d2, d3, d4)>
# CHECK-DAG:   #[[HALF1:.+]] = affine_map<(d0, d1, d2, d3, d4) -> (d0, d1, d2, 0, d4)>
# CHECK-DAG:   #[[HALF2:.+]] = affine_map<(d0, d1, d2, d3, d4) -> (d0, d1, d2, 1, d4)>
# CHECK-DAG:   #[[ANGLE:.+]] = affine_map<(d0, d1, d2, d3, d4) -> (d0, d1, d4)>
# CHECK-LABEL: util.func public @rope(
# CHECK-SAME:    %[[X:.+]]: tensor<2x?x6x16xf16>, %[[POS:.+]]: tensor<2x?xi64>) -> tensor<2x?x6x16xf16>
# CHECK:         %[[FREQS:.+]] = arith.constant dense<[1.000000e+00, {{.+}}]> : tensor<8xf32>
# CHECK:         %[[COS:.+]] = linalg.generic {{.+}} ins(%[[POS]], %[[FREQS]] : tensor<2x?xi64>, tensor<8xf32>)
# CHECK:           math.cos
# CHECK:         %[[SIN:.+]] = linalg.generic {{.+}} ins(%[[POS]], %[[FREQS]] : tensor<2x?xi64>, tensor<8xf32>)
# CHECK:           math.sin
# CHECK:         %[[PAIRS:.+]] = tensor.expand_shape %[[X]] {{\[\[}}0], [1], [2], [3, 4]] {{.+}} into tensor<2x?x6x2x8xf16>
# CHECK-NOT:     tensor.extract_slice
# CHECK:         linalg.generic {indexing_maps = [#[[ALL]], #[[HALF1]], #[[HALF2]], #[[ANGLE]], #[[ANGLE]], #[[ALL]]]
# CHECK-SAME:      ins(%[[PAIRS]], %[[PAIRS]], %[[PAIRS]], %[[COS]], %[[SIN]] :
# CHECK:           %[[FIRST:.+]] = arith.cmpi eq, %{{.+}}, %c0
# CHECK:           %[[NEG_X2:.+]] = arith.negf
# CHECK:           %[[ROT:.+]] = arith.select %[[FIRST]], %[[NEG_X2]], %{{.+}} : f32
# CHECK:           arith.truncf
# CHECK:         tensor.collapse_shape %{{.+}} {{\[\[}}0], [1], [2], [3, 4]] : tensor<2x?x6x2x8xf16> into tensor<2x?x6x16xf16>
freqs = inv_freq(16, 500000.0, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 64})
print_op("rope", [((2, None, 6, 16), "f16"), ((2, None), "i64")],
         lambda b, x, p: rope(b, x, *rope_table(b, p, b.dense(freqs, "f32")), dtype="f16"))
