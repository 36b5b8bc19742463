// RUN: %halo opt %s --split-input-file --shard tp=2 --verify-placement -o - | %FileCheck %s --check-prefix=ONESHOT
// RUN: %halo opt %s --split-input-file --shard tp=2 --allreduce reduce-scatter --verify-placement -o - | %FileCheck %s --check-prefix=RS
// RUN: %halo opt %s --split-input-file --shard tp=2 --allreduce star -o - | %FileCheck %s --check-prefix=STAR
// RUN: %halo opt %s --split-input-file --shard tp=4 --verify-placement -o - | %FileCheck %s --check-prefix=TP4
// RUN: %halo opt %s --split-input-file --shard tp=4 --allreduce reduce-scatter -o - | %FileCheck %s --check-prefix=TP4-RS

// Tests that a column-split matmul feeding a row-split matmul (the MLP pattern) runs on
// local shards with no communication in between, that the row-split partial sums are
// all-reduced (auto picks one-shot for this small static tensor: each device receives the
// other's partial and adds both in device order; reduce-scatter: contiguous 1-D chunks
// summed by their owner, then gathered; star: through device 0), and that the replicated
// input reaches device 1 by one transfer.

// ONESHOT: util.global private @blk.0.ffn_up.weight.shard.0 {stream.affinity = #hal.device.promise<@__device_0>} = #flow.parameter.named<"model"::"blk.0.ffn_up.weight.shard.0"> : tensor<4x4xf32>
// ONESHOT: util.global private @blk.0.ffn_up.weight.shard.1 {stream.affinity = #hal.device.promise<@__device_1>} = #flow.parameter.named<"model"::"blk.0.ffn_up.weight.shard.1"> : tensor<4x4xf32>
// ONESHOT: util.global private @blk.0.ffn_down.weight.shard.0 {{.+}} : tensor<4x4xf32>
// ONESHOT-LABEL: util.func private @mlp$impl(
// ONESHOT-SAME:    %[[X:.+]]: tensor<2x4xf32>) -> tensor<2x4xf32>
// ONESHOT-SAME:    halo.arg_devices = array<i64: 0>
// ONESHOT:         %[[X1:.+]] = flow.tensor.transfer %[[X]] : tensor<2x4xf32> to #hal.device.promise<@__device_1>
// ONESHOT:         %[[UP0:.+]] = util.global.load immutable @blk.0.ffn_up.weight.shard.0
// ONESHOT:         %[[UP1:.+]] = util.global.load immutable @blk.0.ffn_up.weight.shard.1
// ONESHOT:         %[[H0:.+]] = linalg.matmul {{.+}} ins(%[[X]], %[[UP0]] : tensor<2x4xf32>, tensor<4x4xf32>)
// ONESHOT:         %[[H1:.+]] = linalg.matmul {{.+}} ins(%[[X1]], %[[UP1]] : tensor<2x4xf32>, tensor<4x4xf32>)
// ONESHOT:         %[[P0:.+]] = linalg.matmul {{.+}} ins(%[[H0]], %{{.+}} : tensor<2x4xf32>, tensor<4x4xf32>)
// ONESHOT:         %[[P1:.+]] = linalg.matmul {{.+}} ins(%[[H1]], %{{.+}} : tensor<2x4xf32>, tensor<4x4xf32>)
// ONESHOT:         %[[P1_ON0:.+]] = flow.tensor.transfer %[[P1]] : tensor<2x4xf32> to #hal.device.promise<@__device_0>
// ONESHOT:         %[[SUM0:.+]] = linalg.generic {{.+}} ins(%[[P0]], %[[P1_ON0]] : tensor<2x4xf32>, tensor<2x4xf32>)
// ONESHOT:         %[[P0_ON1:.+]] = flow.tensor.transfer %[[P0]] : tensor<2x4xf32> to #hal.device.promise<@__device_1>
// ONESHOT:         linalg.generic {{.+}} ins(%[[P0_ON1]], %[[P1]] : tensor<2x4xf32>, tensor<2x4xf32>)
// ONESHOT-NOT:     tensor.insert_slice
// ONESHOT:         util.return %[[SUM0]]
// ONESHOT-LABEL: util.func public @mlp$async(
// ONESHOT:         hal.tensor.import on(#hal.device.promise<@__device_0>)
// ONESHOT:         hal.tensor.export on(#hal.device.promise<@__device_0>)

// RS-LABEL: util.func private @mlp$impl(
// RS:         %[[P0:.+]] = linalg.matmul {{.+}}ffn_down.weight.shard.0
// RS:         %[[P1:.+]] = linalg.matmul {{.+}}ffn_down.weight.shard.1
// RS:         %[[FLAT0:.+]] = tensor.collapse_shape %[[P0]] {{\[\[}}0, 1]] : tensor<2x4xf32> into tensor<8xf32>
// RS:         %[[FLAT1:.+]] = tensor.collapse_shape %[[P1]] {{\[\[}}0, 1]] : tensor<2x4xf32> into tensor<8xf32>
// RS:         %[[P0_A:.+]] = tensor.extract_slice %[[FLAT0]][0] [4] [1]
// RS:         %[[P1_A:.+]] = tensor.extract_slice %[[FLAT1]][0] [4] [1]
// RS:         %[[P1_A_ON0:.+]] = flow.tensor.transfer %[[P1_A]] : tensor<4xf32> to #hal.device.promise<@__device_0>
// RS:         %[[SUM_A:.+]] = linalg.generic {{.+}} ins(%[[P0_A]], %[[P1_A_ON0]] :
// RS:         %[[P0_B:.+]] = tensor.extract_slice %[[FLAT0]][4] [4] [1]
// RS:         %[[P0_B_ON1:.+]] = flow.tensor.transfer %[[P0_B]] : tensor<4xf32> to #hal.device.promise<@__device_1>
// RS:         %[[P1_B:.+]] = tensor.extract_slice %[[FLAT1]][4] [4] [1]
// RS:         %[[SUM_B:.+]] = linalg.generic {{.+}} ins(%[[P0_B_ON1]], %[[P1_B]] :
// RS:         %[[FIRST:.+]] = tensor.insert_slice %[[SUM_A]] into %{{.+}}[0] [4] [1]
// RS:         %[[SUM_B_ON0:.+]] = flow.tensor.transfer %[[SUM_B]] : tensor<4xf32> to #hal.device.promise<@__device_0>
// RS:         %[[WHOLE:.+]] = tensor.insert_slice %[[SUM_B_ON0]] into %[[FIRST]][4] [4] [1]
// RS:         %[[OUT:.+]] = tensor.expand_shape %[[WHOLE]] {{\[\[}}0, 1]] output_shape [2, 4] : tensor<8xf32> into tensor<2x4xf32>
// RS:         util.return %[[OUT]]

// STAR-LABEL: util.func private @mlp$impl(
// STAR:         %[[P1:.+]] = linalg.matmul {{.+}}ffn_down.weight.shard.1
// STAR:         %[[TO0:.+]] = flow.tensor.transfer %[[P1]] : tensor<2x4xf32> to #hal.device.promise<@__device_0>
// STAR:         %[[SUM:.+]] = linalg.generic {{.+}} ins(%{{.+}}, %[[TO0]] : tensor<2x4xf32>, tensor<2x4xf32>)
// STAR:         flow.tensor.transfer %[[SUM]] : tensor<2x4xf32> to #hal.device.promise<@__device_1>
// STAR-NOT:     flow.tensor.transfer
// STAR:         util.return %[[SUM]]

// One-shot over 4 devices: 3 transfers of the input, then each device receives the 3
// other partial sums (12 transfers) and adds all 4.
// TP4: util.global private @blk.0.ffn_up.weight.shard.3 {stream.affinity = #hal.device.promise<@__device_3>} {{.+}} : tensor<2x4xf32>
// TP4-LABEL: util.func private @mlp$impl(
// TP4-COUNT-3: flow.tensor.transfer %arg0
// TP4-COUNT-4: linalg.matmul {{.+}} ins(%{{.+}}, %{{.+}} : tensor<2x4xf32>, tensor<2x4xf32>) outs(%{{.+}} : tensor<2x2xf32>)
// TP4-COUNT-4: linalg.matmul {{.+}} ins(%{{.+}}, %{{.+}} : tensor<2x2xf32>, tensor<4x2xf32>) outs(%{{.+}} : tensor<2x4xf32>)
// TP4-COUNT-3: flow.tensor.transfer %{{.+}} : tensor<2x4xf32> to #hal.device.promise<@__device_0>
// TP4:         linalg.generic {{.+}} ins(%{{.+}}, %{{.+}}, %{{.+}}, %{{.+}} : tensor<2x4xf32>, tensor<2x4xf32>, tensor<2x4xf32>, tensor<2x4xf32>)
// TP4-COUNT-9: flow.tensor.transfer
// TP4-NOT:     flow.tensor.transfer

// Reduce-scatter over 4 devices: 12 chunk transfers, then 12 gathered chunk transfers.
// TP4-RS-LABEL: util.func private @mlp$impl(
// TP4-RS-COUNT-3: flow.tensor.transfer %arg0
// TP4-RS-COUNT-24: flow.tensor.transfer %{{.+}} : tensor<2xf32>
// TP4-RS-NOT:     flow.tensor.transfer
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
