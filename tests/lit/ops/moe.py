# RUN: %python %s gather | %FileCheck %s --check-prefix=GATHER
# RUN: %python %s grouped | %FileCheck %s --check-prefix=GROUPED
# Tests that the MoE block routes in f32 (softmax, top-k as ranks, renormalized) and reads
# only the picked experts: the decode (gather) form indexes the stacked expert weights
# with each token's expert id inside its contractions; the prefill (grouped) form runs one
# gate/up/down matmul chain per expert on that expert's rows.
import sys

from lit_util import print_op
from halo_mlir.ops.moe import moe_ffn, moe_ffn_grouped

# GATHER-LABEL: util.func public @moe(
# GATHER-SAME:    %[[X:.+]]: tensor<2x1x16xf32>, %[[ROUTER:.+]]: tensor<3x16xf32>, %[[GATE:.+]]: tensor<3x8x16xf32>, %[[UP:.+]]: tensor<3x8x16xf32>, %[[DOWN:.+]]: tensor<3x16x8xf32>)
# GATHER:         linalg.matmul {{.+}} ins(%{{.+}}, %[[ROUTER]] :
# GATHER:         math.exp
# GATHER:         %[[RANKS:.+]] = linalg.generic {{.+}} outs(%{{.+}} : tensor<2x1x3xi64>)
# GATHER:         %[[TOPK:.+]]:2 = linalg.generic {{.+}} ins(%[[RANKS]], {{.+}} outs(%{{.+}}, %{{.+}} : tensor<2x1x2xf32>, tensor<2x1x2xi64>)
# GATHER:         linalg.generic {{.+}} ins(%[[X]], %[[TOPK]]#1 : tensor<2x1x16xf32>, tensor<2x1x2xi64>)
# GATHER:           tensor.extract %[[GATE]][
# GATHER:         linalg.generic {{.+}} ins(%[[X]], %[[TOPK]]#1 :
# GATHER:           tensor.extract %[[UP]][
# GATHER:           tensor.extract %[[DOWN]][
# GATHER-NOT:     linalg.matmul
# GATHER:         util.return

# GROUPED-LABEL: util.func public @moe(
# GROUPED-SAME:    %[[X:.+]]: tensor<2x?x16xf32>
# GROUPED:         linalg.generic {{.+}} outs(%{{.+}} : tensor<3xi64>)
# GROUPED:         iree_linalg_ext.scatter
# GROUPED-COUNT-9: linalg.matmul
# GROUPED-NOT:     linalg.matmul
# GROUPED:         util.return
run = moe_ffn if sys.argv[1] == "gather" else moe_ffn_grouped
seq = 1 if sys.argv[1] == "gather" else None
print_op("moe", [((2, seq, 16), "f32"), ((3, 16), "f32"), ((3, 8, 16), "f32"), ((3, 8, 16), "f32"),
                 ((3, 16, 8), "f32")],
         lambda b, x, r, g, u, d: run(b, x, r, g, u, d, k=2, renormalize=True, dtype="f32"))
