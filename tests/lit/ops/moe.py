# RUN: %python %s gather | %FileCheck %s --check-prefix=GATHER
# RUN: %python %s grouped | %FileCheck %s --check-prefix=GROUPED
# Tests that the MoE block routes in f32 (softmax, then the moe_topk kernel: top-k as
# ranks, renormalized) and reads only the picked experts: the decode (gather) form calls the
# expert_matmul kernel, which indexes the stacked expert weights with each row's expert id
# inside its contraction; the prefill (grouped) form orders the pairs with the moe_group
# kernel (a counting sort) and runs one gate/up/down matmul chain per expert on its rows.
import sys

from lit_util import print_op
from halo_mlir.ops.moe import moe_ffn, moe_ffn_grouped

# GATHER-LABEL: util.func private @halo_moe_topk_e3_k2_renormalize1(%{{.+}}: tensor<?x3xf32>) -> (tensor<?x2xf32>, tensor<?x2xi64>)
# GATHER:         %[[RANKS:.+]] = linalg.generic {{.+}} outs(%{{.+}} : tensor<?x3xi64>)
# GATHER:         linalg.generic {{.+}} ins(%[[RANKS]], {{.+}} outs(%{{.+}}, %{{.+}} : tensor<?x2xf32>, tensor<?x2xi64>)
# GATHER:         arith.divf
# GATHER:       util.func private @halo_expert_matmul_e3_n8_k16_dtypef32_slots2(%{{.+}}: tensor<?x16xf32>, %{{.+}}: tensor<?x2xi64>, %[[W:.+]]: tensor<3x8x16xf32>) -> tensor<?x2x8xf32>
# GATHER:           tensor.extract %[[W]][
# GATHER:       util.func private @halo_expert_matmul_e3_n16_k8_dtypef32(%{{.+}}: tensor<?x8xf32>, %{{.+}}: tensor<?xi64>, %[[W2:.+]]: tensor<3x16x8xf32>) -> tensor<?x16xf32>
# GATHER:           tensor.extract %[[W2]][
# GATHER-LABEL: util.func public @moe(
# GATHER-SAME:    %[[X:.+]]: tensor<2x1x16xf32>, %[[ROUTER:.+]]: tensor<3x16xf32>, %[[GATE:.+]]: tensor<3x8x16xf32>, %[[UP:.+]]: tensor<3x8x16xf32>, %[[DOWN:.+]]: tensor<3x16x8xf32>)
# GATHER:         linalg.matmul {{.+}} ins(%{{.+}}, %[[ROUTER]] :
# GATHER:         math.exp
# GATHER:         util.call @halo_moe_topk_e3_k2_renormalize1(
# GATHER:         util.call @halo_expert_matmul_e3_n8_k16_dtypef32_slots2(%{{.+}}, %{{.+}}, %[[GATE]])
# GATHER:         util.call @halo_expert_matmul_e3_n8_k16_dtypef32_slots2(%{{.+}}, %{{.+}}, %[[UP]])
# GATHER:         util.call @halo_expert_matmul_e3_n16_k8_dtypef32(%{{.+}}, %{{.+}}, %[[DOWN]])
# GATHER-NOT:     linalg.matmul
# GATHER:         util.return

# GROUPED-LABEL: util.func private @halo_moe_group_e3(%{{.+}}: tensor<?xi64>) -> (tensor<?xi64>, tensor<?xi64>, tensor<3xi64>, tensor<3xi64>)
# GROUPED:         linalg.generic {{.+}} outs(%{{.+}} : tensor<3xi64>)
# GROUPED:         iree_linalg_ext.scatter
# GROUPED-LABEL: util.func public @moe(
# GROUPED-SAME:    %[[X:.+]]: tensor<2x?x16xf32>
# GROUPED:         util.call @halo_moe_topk_e3_k2_renormalize1(
# GROUPED:         util.call @halo_moe_group_e3(
# GROUPED-COUNT-9: linalg.matmul
# GROUPED-NOT:     linalg.matmul
# GROUPED:         util.return
run = moe_ffn if sys.argv[1] == "gather" else moe_ffn_grouped
seq = 1 if sys.argv[1] == "gather" else None
print_op("moe", [((2, seq, 16), "f32"), ((3, 16), "f32"), ((3, 8, 16), "f32"), ((3, 8, 16), "f32"),
                 ((3, 16, 8), "f32")],
         lambda b, x, r, g, u, d: run(b, x, r, g, u, d, k=2, renormalize=True, dtype="f32"))
