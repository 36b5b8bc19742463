// RUN: %halo opt %s --shard tp=2 --verify-placement -o - | %FileCheck %s

// Tests that contractions reading stacked expert weights inside their bodies (the MoE
// decode form: `tensor.extract %w[expert, linalg.index d, ...]`) shard along the
// iteration dim that indexes the weight's split dim: the gate experts' ffn rows split, so
// each device computes its half of the hidden rows [2, 4/2] from its shard with local
// indices; the down experts' ffn columns split, so the reduction over ffn leaves partial
// sums, all-reduced once.

// CHECK: util.global private @blk.0.ffn_gate_exps.weight.shard.0 {{.+}} : tensor<3x2x2xf32>
// CHECK: util.global private @blk.0.ffn_down_exps.weight.shard.1 {{.+}} : tensor<3x2x2xf32>
// CHECK-LABEL: util.func private @experts$impl(
// CHECK:         %[[GATE0:.+]] = util.global.load immutable @blk.0.ffn_gate_exps.weight.shard.0
// CHECK:         %[[GATE1:.+]] = util.global.load immutable @blk.0.ffn_gate_exps.weight.shard.1
// CHECK:         %[[DOWN0:.+]] = util.global.load immutable @blk.0.ffn_down_exps.weight.shard.0
// CHECK:         %[[DOWN1:.+]] = util.global.load immutable @blk.0.ffn_down_exps.weight.shard.1
// CHECK:         %[[H0:.+]] = linalg.generic
// CHECK:           tensor.extract %[[GATE0]][%{{.+}}, %{{.+}}, %{{.+}}] : tensor<3x2x2xf32>
// CHECK:         } -> tensor<2x2xf32>
// CHECK:         %[[H1:.+]] = linalg.generic
// CHECK:           tensor.extract %[[GATE1]][
// CHECK:         } -> tensor<2x2xf32>
// CHECK:         %[[P0:.+]] = linalg.generic {{.+}} ins(%[[H0]],
// CHECK:           tensor.extract %[[DOWN0]][
// CHECK:         %[[P1:.+]] = linalg.generic {{.+}} ins(%[[H1]],
// CHECK:           tensor.extract %[[DOWN1]][
// CHECK:         %[[P1_ON0:.+]] = flow.tensor.transfer %[[P1]] : tensor<2x2xf32> to #hal.device.promise<@__device_0>
// CHECK:         %[[SUM:.+]] = linalg.generic {{.+}} ins(%[[P0]], %[[P1_ON0]] :
// CHECK:         util.return %[[SUM]]

util.global private @blk.0.ffn_gate_exps.weight = #flow.parameter.named<"model"::"blk.0.ffn_gate_exps.weight"> : tensor<3x4x2xf32>
util.global private @blk.0.ffn_down_exps.weight = #flow.parameter.named<"model"::"blk.0.ffn_down_exps.weight"> : tensor<3x2x4xf32>
util.func private @experts$impl(%x: tensor<2x2xf32>, %experts: tensor<2xi64>) -> tensor<2x2xf32> attributes {halo.entry = "experts", halo.inplace = array<i64>} {
  %gate = util.global.load immutable @blk.0.ffn_gate_exps.weight : tensor<3x4x2xf32>
  %down = util.global.load immutable @blk.0.ffn_down_exps.weight : tensor<3x2x4xf32>
  %zero = arith.constant 0.0 : f32
  %e0 = tensor.empty() : tensor<2x4xf32>
  %a0 = linalg.fill ins(%zero : f32) outs(%e0 : tensor<2x4xf32>) -> tensor<2x4xf32>
  %h = linalg.generic {indexing_maps = [affine_map<(t, i, f) -> (t, i)>, affine_map<(t, i, f) -> (t)>, affine_map<(t, i, f) -> (t, f)>], iterator_types = ["parallel", "reduction", "parallel"]} ins(%x, %experts : tensor<2x2xf32>, tensor<2xi64>) outs(%a0 : tensor<2x4xf32>) {
  ^bb0(%xv: f32, %ev: i64, %acc: f32):
    %e = arith.index_cast %ev : i64 to index
    %f = linalg.index 2 : index
    %i = linalg.index 1 : index
    %w = tensor.extract %gate[%e, %f, %i] : tensor<3x4x2xf32>
    %p = arith.mulf %xv, %w : f32
    %s = arith.addf %acc, %p : f32
    linalg.yield %s : f32
  } -> tensor<2x4xf32>
  %e1 = tensor.empty() : tensor<2x2xf32>
  %a1 = linalg.fill ins(%zero : f32) outs(%e1 : tensor<2x2xf32>) -> tensor<2x2xf32>
  %y = linalg.generic {indexing_maps = [affine_map<(t, f, o) -> (t, f)>, affine_map<(t, f, o) -> (t)>, affine_map<(t, f, o) -> (t, o)>], iterator_types = ["parallel", "reduction", "parallel"]} ins(%h, %experts : tensor<2x4xf32>, tensor<2xi64>) outs(%a1 : tensor<2x2xf32>) {
  ^bb0(%hv: f32, %ev: i64, %acc: f32):
    %e = arith.index_cast %ev : i64 to index
    %o = linalg.index 2 : index
    %f = linalg.index 1 : index
    %w = tensor.extract %down[%e, %o, %f] : tensor<3x2x4xf32>
    %p = arith.mulf %hv, %w : f32
    %s = arith.addf %acc, %p : f32
    linalg.yield %s : f32
  } -> tensor<2x2xf32>
  util.return %y : tensor<2x2xf32>
}
