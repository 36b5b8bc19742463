// RUN: not %halo emit --model toy --tp 3 -o %t.mlir 2>&1 | %FileCheck %s --check-prefix=DIVIDE
// RUN: not %halo opt %s --verify-placement -o %t.out.mlir 2>&1 | %FileCheck %s --check-prefix=MIXED
// RUN: not %halo opt %s --shard tp=two -o %t.out2.mlir 2>&1 | %FileCheck %s --check-prefix=FLAG
// Tests that a TP degree that does not divide the kv heads, and a module whose op reads
// values from two devices without a transfer, are one-line errors at emit/opt time.

// DIVIDE: error: --tp 3 does not divide the kv heads (8) of toy; use a TP degree among [1, 2, 4, 8]
// MIXED: error: linalg.generic at {{.+}}: operands live on devices [0, 1]; a flow.tensor.transfer is missing
// FLAG: error: --shard expects tp=N with N >= 1, got 'tp=two'
util.global private @w0 {stream.affinity = #hal.device.promise<@__device_0>} = #flow.parameter.named<"model"::"w"> : tensor<4xf32>
util.global private @w1 {stream.affinity = #hal.device.promise<@__device_1>} = #flow.parameter.named<"model"::"w"> : tensor<4xf32>
util.func private @f$impl() -> tensor<4xf32> attributes {halo.entry = "f", halo.inplace = array<i64>, halo.arg_devices = array<i64>} {
  %a = util.global.load immutable @w0 : tensor<4xf32>
  %b = util.global.load immutable @w1 : tensor<4xf32>
  %e = tensor.empty() : tensor<4xf32>
  %s = linalg.generic {indexing_maps = [affine_map<(i) -> (i)>, affine_map<(i) -> (i)>, affine_map<(i) -> (i)>], iterator_types = ["parallel"]} ins(%a, %b : tensor<4xf32>, tensor<4xf32>) outs(%e : tensor<4xf32>) {
  ^bb0(%x: f32, %y: f32, %o: f32):
    %z = arith.addf %x, %y : f32
    linalg.yield %z : f32
  } -> tensor<4xf32>
  util.return %s : tensor<4xf32>
}
