// RUN: %halo opt %s --split-input-file --shard tp=2 --verify-placement -o - | %FileCheck %s --check-prefix=RING
// RUN: %halo opt %s --split-input-file --shard tp=2 --allreduce star -o - | %FileCheck %s --check-prefix=STAR
// RUN: %halo opt %s --split-input-file --shard tp=4 -o - | %FileCheck %s --check-prefix=TP4

// Tests that a column-split matmul feeding a row-split matmul (the MLP pattern) runs on
// local shards with no communication in between, that the row-split partial sums are
// all-reduced (ring: reduce-scatter + all-gather; star: through device 0), and that the
// replicated input reaches device 1 by one transfer.

// RING: util.global private @blk.0.ffn_up.weight.shard.0 {stream.affinity = #hal.device.promise<@__device_0>} = #flow.parameter.named<"model"::"blk.0.ffn_up.weight.shard.0"> : tensor<4x4xf32>
// RING: util.global private @blk.0.ffn_up.weight.shard.1 {stream.affinity = #hal.device.promise<@__device_1>} = #flow.parameter.named<"model"::"blk.0.ffn_up.weight.shard.1"> : tensor<4x4xf32>
// RING: util.global private @blk.0.ffn_down.weight.shard.0 {{.+}} : tensor<4x4xf32>
// RING-LABEL: util.func private @mlp$impl(
// RING-SAME:    %[[X:.+]]: tensor<2x4xf32>) -> tensor<2x4xf32>
// RING-SAME:    halo.arg_devices = array<i64: 0>
// RING:         %[[X1:.+]] = flow.tensor.transfer %[[X]] : tensor<2x4xf32> to #hal.device.promise<@__device_1>
// RING:         %[[UP0:.+]] = util.global.load immutable @blk.0.ffn_up.weight.shard.0
// RING:         %[[UP1:.+]] = util.global.load immutable @blk.0.ffn_up.weight.shard.1
// RING:         %[[H0:.+]] = linalg.matmul {{.+}} ins(%[[X]], %[[UP0]] : tensor<2x4xf32>, tensor<4x4xf32>)
// RING:         %[[H1:.+]] = linalg.matmul {{.+}} ins(%[[X1]], %[[UP1]] : tensor<2x4xf32>, tensor<4x4xf32>)
// RING:         %[[P0:.+]] = linalg.matmul {{.+}} ins(%[[H0]], %{{.+}} : tensor<2x4xf32>, tensor<4x4xf32>)
// RING:         %[[P1:.+]] = linalg.matmul {{.+}} ins(%[[H1]], %{{.+}} : tensor<2x4xf32>, tensor<4x4xf32>)
// RING:         %[[P1_A:.+]] = tensor.extract_slice %[[P1]][0, 0] [2, 2]
// RING:         %[[TO0:.+]] = flow.tensor.transfer %[[P1_A]] : tensor<2x2xf32> to #hal.device.promise<@__device_0>
// RING:         %[[SUM0:.+]] = linalg.generic {{.+}} ins(%{{.+}}, %[[TO0]] :
// RING:         %[[P0_B:.+]] = tensor.extract_slice %[[P0]][0, 2] [2, 2]
// RING:         %[[TO1:.+]] = flow.tensor.transfer %[[P0_B]] : tensor<2x2xf32> to #hal.device.promise<@__device_1>
// RING:         %[[SUM1:.+]] = linalg.generic {{.+}} ins(%[[TO1]], %{{.+}} :
// RING:         %[[BACK:.+]] = flow.tensor.transfer %[[SUM1]] : tensor<2x2xf32> to #hal.device.promise<@__device_0>
// RING:         %[[FIRST:.+]] = tensor.insert_slice %[[SUM0]] into %{{.+}}[0, 0] [2, 2]
// RING:         %[[FULL:.+]] = tensor.insert_slice %[[BACK]] into %[[FIRST]][0, 2] [2, 2]
// RING:         util.return %[[FULL]]
// RING-LABEL: util.func public @mlp$async(
// RING:         hal.tensor.import on(#hal.device.promise<@__device_0>)
// RING:         hal.tensor.export on(#hal.device.promise<@__device_0>)

// STAR-LABEL: util.func private @mlp$impl(
// STAR:         %[[P1:.+]] = linalg.matmul {{.+}}ffn_down.weight.shard.1
// STAR:         %[[TO0:.+]] = flow.tensor.transfer %[[P1]] : tensor<2x4xf32> to #hal.device.promise<@__device_0>
// STAR:         %[[SUM:.+]] = linalg.generic {{.+}} ins(%{{.+}}, %[[TO0]] : tensor<2x4xf32>, tensor<2x4xf32>)
// STAR:         flow.tensor.transfer %[[SUM]] : tensor<2x4xf32> to #hal.device.promise<@__device_1>
// STAR-NOT:     flow.tensor.transfer
// STAR:         util.return %[[SUM]]

// TP4: util.global private @blk.0.ffn_up.weight.shard.3 {stream.affinity = #hal.device.promise<@__device_3>} {{.+}} : tensor<2x4xf32>
// TP4-LABEL: util.func private @mlp$impl(
// TP4-COUNT-3: flow.tensor.transfer %arg0
// TP4-COUNT-4: linalg.matmul {{.+}} ins(%{{.+}}, %{{.+}} : tensor<2x4xf32>, tensor<2x4xf32>) outs(%{{.+}} : tensor<2x2xf32>)
// TP4-COUNT-4: linalg.matmul {{.+}} ins(%{{.+}}, %{{.+}} : tensor<2x2xf32>, tensor<4x2xf32>) outs(%{{.+}} : tensor<2x4xf32>)
// TP4-COUNT-24: flow.tensor.transfer
// TP4-NOT:     flow.tensor.transfer
util.global private @blk.0.ffn_up.weight = #flow.parameter.named<"model"::"blk.0.ffn_up.weight"> : tensor<8x4xf32>
util.global private @blk.0.ffn_down.weight = #flow.parameter.named<"model"::"blk.0.ffn_down.weight"> : tensor<4x8xf32>
util.func private @mlp$impl(%x: tensor<2x4xf32>) -> tensor<2x4xf32> attributes {halo.entry = "mlp", halo.inplace = array<i64>} {
  %up = util.global.load immutable @blk.0.ffn_up.weight : tensor<8x4xf32>
  %down = util.global.load immutable @blk.0.ffn_down.weight : tensor<4x8xf32>
  %zero = arith.constant 0.0 : f32
  %e0 = tensor.empty() : tensor<2x8xf32>
  %a0 = linalg.fill ins(%zero : f32) outs(%e0 : tensor<2x8xf32>) -> tensor<2x8xf32>
  %h = linalg.matmul indexing_maps = [affine_map<(m, n, k) -> (m, k)>, affine_map<(m, n, k) -> (n, k)>, affine_map<(m, n, k) -> (m, n)>] ins(%x, %up : tensor<2x4xf32>, tensor<8x4xf32>) outs(%a0 : tensor<2x8xf32>) -> tensor<2x8xf32>
  %e1 = tensor.empty() : tensor<2x4xf32>
  %a1 = linalg.fill ins(%zero : f32) outs(%e1 : tensor<2x4xf32>) -> tensor<2x4xf32>
  %y = linalg.matmul indexing_maps = [affine_map<(m, n, k) -> (m, k)>, affine_map<(m, n, k) -> (n, k)>, affine_map<(m, n, k) -> (m, n)>] ins(%h, %down : tensor<2x8xf32>, tensor<4x8xf32>) outs(%a1 : tensor<2x4xf32>) -> tensor<2x4xf32>
  util.return %y : tensor<2x4xf32>
}
