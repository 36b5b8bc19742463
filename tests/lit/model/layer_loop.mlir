// RUN: %halo emit --model toy --layers 3 --layer-loop --bs-prefill 1 --bs-decode 4 --no-locations -o %t.mlir
// RUN: %FileCheck %s --input-file=%t.mlir
// RUN: %iree-opt %t.mlir -o %t.verified.mlir
// RUN: %halo emit --model toy --layers 3 --layer-loop --bs-prefill 1 --bs-decode 4 --no-locations --tp 2 -o %t.tp2.mlir
// RUN: %FileCheck %s --check-prefix=TP2 --input-file=%t.tp2.mlir
// Tests `--layer-loop`: one global per weight kind holding every layer ([3, ...]), an
// scf.for over the 3 layers whose body pins its carried values (hidden state, K/V
// accumulator) with flow.tensor.barrier, slices layer %l's weights, and calls the one layer
// function; the cache is written once, after the loop, by one scatter of whole pages.

// CHECK: util.global private @blk.attn_q.weight.stacked = #flow.parameter.named<"model"::"blk.attn_q.weight.stacked"> : tensor<3x512x512xf16>
// CHECK: util.global private @blk.ffn_down.weight.stacked = #flow.parameter.named<"model"::"blk.ffn_down.weight.stacked"> : tensor<3x512x1024xf16>
// CHECK-NOT: @blk.0.

// CHECK-LABEL: util.func private @decode_bs4$impl(
// CHECK:         %[[C3:.+]] = arith.constant 3 : index
// CHECK:         %[[LOOP:.+]]:2 = scf.for %[[L:.+]] = %{{.+}} to %[[C3]] step %{{.+}} iter_args(%[[H:.+]] = %{{.+}}, %[[ACC:.+]] = %{{.+}}) -> (tensor<4x1x512xf16>, tensor<4x3x2x8x64xf16>)
// CHECK:           flow.tensor.barrier %[[ACC]] : tensor<4x3x2x8x64xf16> on #hal.device.promise<@__device_0>
// CHECK:           tensor.extract_slice %blk.attn_q.weight.stacked[%[[L]], 0, 0] [1, 512, 512]
// CHECK:           flow.tensor.barrier %[[H]] : tensor<4x1x512xf16> on #hal.device.promise<@__device_0>
// CHECK:           %[[OUT:.+]]:2 = util.call @decode_bs4$layer0(
// CHECK:           scf.yield %[[OUT]]#0, %[[OUT]]#1
// CHECK:         iree_linalg_ext.scatter dimension_map = [0] unique_indices(true) ins(%{{.+}}, %{{.+}} : tensor<4x3x2x8x32x64xf16>, tensor<4x1xi64>)
// CHECK-NOT:     scf.for
// CHECK:         util.return

// On 2 devices: one loop carrying each value once per device, each pinned to its device.
// TP2-LABEL: util.func private @decode_bs4$impl(
// TP2:         scf.for %{{.+}} = %{{.+}} to %{{.+}} step %{{.+}} iter_args({{.+}}) -> (tensor<4x1x512xf16>, tensor<4x1x512xf16>, tensor<4x3x2x4x64xf16>, tensor<4x3x2x4x64xf16>)
// TP2-DAG:       flow.tensor.barrier %{{.+}} : tensor<4x3x2x4x64xf16> on #hal.device.promise<@__device_0>
// TP2-DAG:       flow.tensor.barrier %{{.+}} : tensor<4x3x2x4x64xf16> on #hal.device.promise<@__device_1>
// TP2-DAG:       tensor.extract_slice %blk.attn_q.weight.stacked.shard.1[%{{.+}}, 0, 0] [1, 256, 512]
// TP2:           scf.yield
