# RUN: %python %s fused | %FileCheck %s --check-prefix=FUSED
# RUN: %python %s decomposed | %FileCheck %s --check-prefix=DECOMP
# Tests that GQA attention indexes K/V per kv head without repeating them, masks key t for
# query position p when t > p or t >= kv_len, and keeps the softmax in f32, in both forms.
import sys

from lit_util import print_op
from halo_mlir.ops.attention import ATTENTION

# FUSED-DAG: #[[Q_MAP:.+]] = affine_map<(d0, d1, d2, d3, d4, d5, d6) -> (d0, d1, d2, d3, d4)>
# FUSED-DAG: #[[K_MAP:.+]] = affine_map<(d0, d1, d2, d3, d4, d5, d6) -> (d0, d1, d5, d4)>
# FUSED-DAG: #[[V_MAP:.+]] = affine_map<(d0, d1, d2, d3, d4, d5, d6) -> (d0, d1, d5, d6)>
# FUSED-DAG: #[[MASK_MAP:.+]] = affine_map<(d0, d1, d2, d3, d4, d5, d6) -> (d0, d3, d5)>
# FUSED-DAG: #[[OUT_MAP:.+]] = affine_map<(d0, d1, d2, d3, d4, d5, d6) -> (d0, d1, d2, d3, d6)>
# FUSED-LABEL: util.func public @attention(
# FUSED-SAME:    %[[Q:.+]]: tensor<2x?x2x3x16xf16>, %[[K:.+]]: tensor<2x2x?x16xf16>, %[[V:.+]]: tensor<2x2x?x16xf16>, %[[QPOS:.+]]: tensor<2x?xi64>, %[[LEN:.+]]: tensor<2xi64>)
# FUSED:         %[[MASK:.+]] = linalg.generic {{.+}} ins(%[[QPOS]], %[[LEN]] : tensor<2x?xi64>, tensor<2xi64>) outs(%{{.+}} : tensor<2x?x?xi1>)
# FUSED:           %[[T:.+]] = arith.index_cast
# FUSED:           %[[CAUSAL:.+]] = arith.cmpi sle, %[[T]], %{{.+}} : i64
# FUSED:           %[[INSIDE:.+]] = arith.cmpi slt, %[[T]], %{{.+}} : i64
# FUSED:           arith.andi %[[CAUSAL]], %[[INSIDE]] : i1
# FUSED:         %[[QT:.+]] = linalg.transpose ins(%[[Q]] : {{.+}}) outs({{.+}} : tensor<2x2x3x?x16xf16>) permutation = [0, 2, 3, 1, 4]
# FUSED:         %[[SCALE:.+]] = arith.constant 2.500000e-01 : f32
# FUSED:         %[[OUT:.+]] = iree_linalg_ext.attention <indexing_maps = [#[[Q_MAP]], #[[K_MAP]], #[[V_MAP]], #{{.+}}, #[[MASK_MAP]], #[[OUT_MAP]]]>
# FUSED-SAME:      ins(%[[QT]], %[[K]], %[[V]], %[[SCALE]], %[[MASK]] : tensor<2x2x3x?x16xf16>, tensor<2x2x?x16xf16>, tensor<2x2x?x16xf16>, f32, tensor<2x?x?xi1>)
# FUSED:         linalg.transpose ins(%[[OUT]] : {{.+}}) permutation = [0, 3, 1, 2, 4]

# DECOMP-LABEL: util.func public @attention(
# DECOMP-SAME:    %[[Q:.+]]: tensor<2x?x2x3x16xf16>, %[[K:.+]]: tensor<2x2x?x16xf16>, %[[V:.+]]: tensor<2x2x?x16xf16>
# DECOMP:         %[[SCORES:.+]] = linalg.generic {{.+}} ins(%[[Q]], %[[K]] : {{.+}}) outs(%{{.+}} : tensor<2x2x3x?x?xf32>)
# DECOMP:         %[[MASKED:.+]] = linalg.generic {{.+}} ins(%[[SCORES]], %{{.+}}, %{{.+}} : tensor<2x2x3x?x?xf32>, tensor<2x?xi64>, tensor<2xi64>)
# DECOMP:           arith.select %{{.+}}, %{{.+}}, %cst_{{.+}} : f32
# DECOMP:         %[[MAX:.+]] = linalg.generic {{.+}} ins(%[[MASKED]] : {{.+}}) outs(%{{.+}} : tensor<2x2x3x?xf32>)
# DECOMP:           arith.maximumf
# DECOMP:         %[[EXP:.+]] = linalg.generic {{.+}} ins(%[[MASKED]], %[[MAX]] :
# DECOMP:           math.exp
# DECOMP:         %[[SUM:.+]] = linalg.generic {{.+}} ins(%[[EXP]] :
# DECOMP:         %[[PV:.+]] = linalg.generic {{.+}} ins(%[[EXP]], %[[V]] : tensor<2x2x3x?x?xf32>, tensor<2x2x?x16xf16>) outs(%{{.+}} : tensor<2x?x2x3x16xf32>)
# DECOMP:         linalg.generic {{.+}} ins(%[[PV]], %[[SUM]] :
# DECOMP:           arith.divf
# DECOMP:           arith.truncf %{{.+}} : f32 to f16
form = sys.argv[1]
print_op("attention",
         [((2, None, 2, 3, 16), "f16"), ((2, 2, None, 16), "f16"), ((2, 2, None, 16), "f16"),
          ((2, None), "i64"), ((2,), "i64")],
         lambda b, q, k, v, p, n: ATTENTION[form](b, q, k, v, p, n, dtype="f16"))
