// RUN: %halo opt %s --split-input-file --shard tp=2 --verify-placement -o - | %FileCheck %s
// RUN: %halo opt %s --split-input-file --shard tp=2 --allreduce-dtype f32 --verify-placement -o - | %FileCheck %s --check-prefix=F32
// RUN: not %halo opt %s --split-input-file --shard tp=2 --allreduce ring -o - 2>&1 | %FileCheck %s --check-prefix=RING

// Tests that the partial sums of a row-split f16 linear (f32 accumulator, then truncf)
// travel in f16 by default: each device rounds its own accumulator, the all-reduce
// (one-shot: `auto` on a small static tensor) sums the two f16 partials in f32, in device
// order, rounds once, and the residual add consumes the sum. With --allreduce-dtype f32
// the f32 accumulators travel and the rounding follows the sum.

// CHECK-LABEL: util.func private @down$impl(
// CHECK:         %[[P0:.+]] = linalg.matmul {{.+}}ffn_down.weight.shard.0 : tensor<2x4xf16>, tensor<4x4xf16>) outs(%{{.+}} : tensor<2x4xf32>)
// CHECK:         %[[P1:.+]] = linalg.matmul {{.+}}ffn_down.weight.shard.1 : tensor<2x4xf16>, tensor<4x4xf16>) outs(%{{.+}} : tensor<2x4xf32>)
// CHECK:         %[[H0:.+]] = linalg.generic {{.+}} ins(%[[P0]] : tensor<2x4xf32>) outs(%{{.+}} : tensor<2x4xf16>)
// CHECK:           arith.truncf
// CHECK:         %[[H1:.+]] = linalg.generic {{.+}} ins(%[[P1]] : tensor<2x4xf32>) outs(%{{.+}} : tensor<2x4xf16>)
// CHECK:         %[[H1_ON0:.+]] = flow.tensor.transfer %[[H1]] : tensor<2x4xf16> to #hal.device.promise<@__device_0>
// CHECK:         %[[SUM0:.+]] = linalg.generic {{.+}} ins(%[[H0]], %[[H1_ON0]] : tensor<2x4xf16>, tensor<2x4xf16>)
// CHECK:           %[[A:.+]] = arith.extf %{{.+}} : f16 to f32
// CHECK:           %[[B:.+]] = arith.extf %{{.+}} : f16 to f32
// CHECK:           %[[AB:.+]] = arith.addf %[[A]], %[[B]] : f32
// CHECK:           arith.truncf %[[AB]] : f32 to f16
// CHECK:         %[[H0_ON1:.+]] = flow.tensor.transfer %[[H0]] : tensor<2x4xf16> to #hal.device.promise<@__device_1>
// CHECK:         linalg.generic {{.+}} ins(%[[H0_ON1]], %[[H1]] : tensor<2x4xf16>, tensor<2x4xf16>)
// CHECK:         %[[OUT:.+]] = linalg.generic {{.+}} ins(%arg1, %[[SUM0]] : tensor<2x4xf16>, tensor<2x4xf16>)
// CHECK:         util.return %[[OUT]]

// F32-LABEL: util.func private @down$impl(
// F32:         %[[P0:.+]] = linalg.matmul {{.+}}ffn_down.weight.shard.0
// F32:         %[[P1:.+]] = linalg.matmul {{.+}}ffn_down.weight.shard.1
// F32:         %[[P1_ON0:.+]] = flow.tensor.transfer %[[P1]] : tensor<2x4xf32> to #hal.device.promise<@__device_0>
// F32:         %[[SUM0:.+]] = linalg.generic {{.+}} ins(%[[P0]], %[[P1_ON0]] : tensor<2x4xf32>, tensor<2x4xf32>)
// F32:         flow.tensor.transfer %[[P0]] : tensor<2x4xf32> to #hal.device.promise<@__device_1>
// F32:         %[[H0:.+]] = linalg.generic {{.+}} ins(%[[SUM0]] : tensor<2x4xf32>) outs(%{{.+}} : tensor<2x4xf16>)
// F32:           arith.truncf
// F32:         %[[OUT:.+]] = linalg.generic {{.+}} ins(%arg1, %[[H0]] : tensor<2x4xf16>, tensor<2x4xf16>)
// F32:         util.return %[[OUT]]

// RING: Error: Invalid value for '--allreduce': --allreduce ring is now called 'reduce-scatter'
util.global private @blk.0.ffn_down.weight = #flow.parameter.named<"model"::"blk.0.ffn_down.weight"> : tensor<4x8xf16>
util.func private @down$impl(%x: tensor<2x8xf16>, %res: tensor<2x4xf16>) -> tensor<2x4xf16> attributes {halo.entry = "down", halo.inplace = array<i64>} {
  %w = util.global.load immutable @blk.0.ffn_down.weight : tensor<4x8xf16>
  %zero = arith.constant 0.0 : f32
  %e = tensor.empty() : tensor<2x4xf32>
  %acc = linalg.fill ins(%zero : f32) outs(%e : tensor<2x4xf32>) -> tensor<2x4xf32>
  %p = linalg.matmul indexing_maps = [affine_map<(m, n, k) -> (m, k)>, affine_map<(m, n, k) -> (n, k)>, affine_map<(m, n, k) -> (m, n)>] ins(%x, %w : tensor<2x8xf16>, tensor<4x8xf16>) outs(%acc : tensor<2x4xf32>) -> tensor<2x4xf32>
  %e16 = tensor.empty() : tensor<2x4xf16>
  %y = linalg.generic {indexing_maps = [affine_map<(i, j) -> (i, j)>, affine_map<(i, j) -> (i, j)>], iterator_types = ["parallel", "parallel"]} ins(%p : tensor<2x4xf32>) outs(%e16 : tensor<2x4xf16>) {
  ^bb0(%a: f32, %o: f16):
    %t = arith.truncf %a : f32 to f16
    linalg.yield %t : f16
  } -> tensor<2x4xf16>
  %out = linalg.generic {indexing_maps = [affine_map<(i, j) -> (i, j)>, affine_map<(i, j) -> (i, j)>, affine_map<(i, j) -> (i, j)>], iterator_types = ["parallel", "parallel"]} ins(%res, %y : tensor<2x4xf16>, tensor<2x4xf16>) outs(%e16 : tensor<2x4xf16>) {
  ^bb0(%a: f16, %b: f16, %o: f16):
    %s = arith.addf %a, %b : f16
    linalg.yield %s : f16
  } -> tensor<2x4xf16>
  util.return %out : tensor<2x4xf16>
}

// -----

// Tests that `auto` reduce-scatters a tensor of dynamic size (prefill): each partial is
// flattened to 1-D and cut into contiguous halves whose sizes come from the dynamic dim,
// device j sums half j, and every device gathers both halves and restores the shape.

// CHECK-LABEL: util.func private @prefill$impl(
// CHECK:         %[[P0:.+]] = linalg.matmul {{.+}}ffn_down.weight.shard.0 : tensor<?x4xf32>, tensor<4x4xf32>)
// CHECK:         %[[P1:.+]] = linalg.matmul {{.+}}ffn_down.weight.shard.1 : tensor<?x4xf32>, tensor<4x4xf32>)
// CHECK:         %[[FLAT0:.+]] = tensor.collapse_shape %[[P0]] {{\[\[}}0, 1]] : tensor<?x4xf32> into tensor<?xf32>
// CHECK:         %[[FLAT1:.+]] = tensor.collapse_shape %[[P1]] {{\[\[}}0, 1]] : tensor<?x4xf32> into tensor<?xf32>
// CHECK:         %[[ROWS0:.+]] = tensor.dim %[[P0]], %{{.+}} : tensor<?x4xf32>
// CHECK:         %[[HALF0:.+]] = arith.muli %[[ROWS0]], %{{.+}} : index
// CHECK:         %[[ROWS1:.+]] = tensor.dim %[[P1]], %{{.+}} : tensor<?x4xf32>
// CHECK:         %[[HALF1:.+]] = arith.muli %[[ROWS1]], %{{.+}} : index
// CHECK:         %[[P0_A:.+]] = tensor.extract_slice %[[FLAT0]][%{{.+}}] [%[[HALF0]]] [1]
// CHECK:         %[[P1_A:.+]] = tensor.extract_slice %[[FLAT1]][%{{.+}}] [%[[HALF1]]] [1]
// CHECK:         %[[P1_A_ON0:.+]] = flow.tensor.transfer %[[P1_A]] : tensor<?xf32>{%{{.+}}} to #hal.device.promise<@__device_0>
// CHECK:         %[[SUM_A:.+]] = linalg.generic {{.+}} ins(%[[P0_A]], %[[P1_A_ON0]] : tensor<?xf32>, tensor<?xf32>)
// CHECK:         %[[P0_B:.+]] = tensor.extract_slice %[[FLAT0]][%[[HALF0]]] [%[[HALF0]]] [1]
// CHECK:         flow.tensor.transfer %[[P0_B]] : tensor<?xf32>{%{{.+}}} to #hal.device.promise<@__device_1>
// CHECK:         %[[SUM_B:.+]] = linalg.generic
// CHECK:         %[[FIRST:.+]] = tensor.insert_slice %[[SUM_A]] into %{{.+}}[%{{.+}}] [%[[HALF0]]] [1]
// CHECK:         %[[SUM_B_ON0:.+]] = flow.tensor.transfer %[[SUM_B]] : tensor<?xf32>{%{{.+}}} to #hal.device.promise<@__device_0>
// CHECK:         %[[WHOLE:.+]] = tensor.insert_slice %[[SUM_B_ON0]] into %[[FIRST]][%[[HALF0]]] [%[[HALF0]]] [1]
// CHECK:         %[[OUT:.+]] = tensor.expand_shape %[[WHOLE]] {{\[\[}}0, 1]] output_shape [%{{.+}}, 4] : tensor<?xf32> into tensor<?x4xf32>
// CHECK:         util.return %[[OUT]]
util.global private @blk.0.ffn_down.weight = #flow.parameter.named<"model"::"blk.0.ffn_down.weight"> : tensor<4x8xf32>
util.func private @prefill$impl(%x: tensor<?x8xf32>) -> tensor<?x4xf32> attributes {halo.entry = "prefill", halo.inplace = array<i64>} {
  %w = util.global.load immutable @blk.0.ffn_down.weight : tensor<4x8xf32>
  %c0 = arith.constant 0 : index
  %n = tensor.dim %x, %c0 : tensor<?x8xf32>
  %zero = arith.constant 0.0 : f32
  %e = tensor.empty(%n) : tensor<?x4xf32>
  %acc = linalg.fill ins(%zero : f32) outs(%e : tensor<?x4xf32>) -> tensor<?x4xf32>
  %p = linalg.matmul indexing_maps = [affine_map<(m, n, k) -> (m, k)>, affine_map<(m, n, k) -> (n, k)>, affine_map<(m, n, k) -> (m, n)>] ins(%x, %w : tensor<?x8xf32>, tensor<4x8xf32>) outs(%acc : tensor<?x4xf32>) -> tensor<?x4xf32>
  util.return %p : tensor<?x4xf32>
}
