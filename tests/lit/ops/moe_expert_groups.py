# RUN: %python %s | %FileCheck %s
# Tests that expert parallelism's form views the stacked experts [E, ...] as [groups,
# E/groups, ...] (the group is the dim the sharding pass splits over devices), reads them
# only through plain batched contractions (no tensor.extract of a weight: no gather), and
# sums the experts' outputs weighted by the router over (group, expert) in one reduction.
from lit_util import print_op
from halo_mlir.ops.moe import moe_ffn_expert_groups

# CHECK-LABEL: util.func public @moe(
# CHECK-SAME:    %[[X:.+]]: tensor<2x1x16xf32>, %[[ROUTER:.+]]: tensor<4x16xf32>, %[[GATE:.+]]: tensor<4x8x16xf32>, %[[UP:.+]]: tensor<4x8x16xf32>, %[[DOWN:.+]]: tensor<4x16x8xf32>)
# CHECK:         linalg.matmul {{.+}} ins(%{{.+}}, %[[ROUTER]] :
# CHECK-DAG:     %[[G:.+]] = tensor.expand_shape %[[GATE]] {{.+}} into tensor<2x2x8x16xf32>
# CHECK-DAG:     %[[U:.+]] = tensor.expand_shape %[[UP]] {{.+}} into tensor<2x2x8x16xf32>
# CHECK-DAG:     %[[D:.+]] = tensor.expand_shape %[[DOWN]] {{.+}} into tensor<2x2x16x8xf32>
# CHECK:         %[[R:.+]] = linalg.generic {{.+}} outs(%{{.+}} : tensor<2x1x2x2xf32>)
# CHECK:         linalg.generic {{.+}} ins(%[[X]], %[[G]] : tensor<2x1x16xf32>, tensor<2x2x8x16xf32>) outs(%{{.+}} : tensor<2x1x2x2x8xf32>)
# CHECK:         linalg.generic {{.+}} ins(%[[X]], %[[U]] :
# CHECK:         linalg.generic {{.+}} ins(%{{.+}}, %[[D]] : tensor<2x1x2x2x8xf32>, tensor<2x2x16x8xf32>) outs(%{{.+}} : tensor<2x1x2x2x16xf32>)
# CHECK:         linalg.generic {{.+}} ins(%{{.+}}, %[[R]] : tensor<2x1x2x2x16xf32>, tensor<2x1x2x2xf32>) outs(%{{.+}} : tensor<2x1x16xf32>)
# CHECK-NOT:     tensor.extract
# CHECK:         util.return
print_op("moe", [((2, 1, 16), "f32"), ((4, 16), "f32"), ((4, 8, 16), "f32"), ((4, 8, 16), "f32"),
                 ((4, 16, 8), "f32")],
         lambda b, x, r, g, u, d: moe_ffn_expert_groups(b, x, r, g, u, d, k=2, renormalize=True,
                                                        dtype="f32", groups=2))
