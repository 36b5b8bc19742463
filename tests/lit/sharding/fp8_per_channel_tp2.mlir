// RUN: %halo emit --model toy --layers 1 --dtype fp8 --fp8-scales per-channel --tp 2 --bs-prefill 1 --bs-decode 1 --no-locations -o %t.mlir 2> %t.report
// RUN: %FileCheck %s --input-file=%t.mlir
// RUN: %FileCheck %s --input-file=%t.report --check-prefix=REPORT

// Tests per-channel fp8 weight scales under --tp 2: a weight split by rows (q/k/v/gate/up)
// takes its rows' scales (`KEY:d_rows.shard.i`, half the rows, on device i); a weight
// split by columns (attn_output/down) reads every row's scale on each device (`KEY:d_rows`
// replicated), and its kernel scales each device's partial sum in the epilogue (x_rscale *
// d_rows[n], then the f16 rounding) with no transfer inside: the partial sums go back to
// the caller, which all-reduces them (one-shot in decode), as for per-tensor scales.

// CHECK: util.global private @"blk.0.attn_q.weight:d_rows.shard.0" {stream.affinity = #hal.device.promise<@__device_0>} = #flow.parameter.named<"model"::"blk.0.attn_q.weight:d_rows.shard.0"> : tensor<256xf32>
// CHECK: util.global private @"blk.0.attn_q.weight:d_rows.shard.1" {stream.affinity = #hal.device.promise<@__device_1>} = #flow.parameter.named<"model"::"blk.0.attn_q.weight:d_rows.shard.1"> : tensor<256xf32>
// CHECK: util.global private @"blk.0.attn_output.weight:d_rows$dev0" {stream.affinity = #hal.device.promise<@__device_0>} = #flow.parameter.named<"model"::"blk.0.attn_output.weight:d_rows"> : tensor<512xf32>
// CHECK: util.global private @"blk.0.attn_output.weight:d_rows$dev1" {stream.affinity = #hal.device.promise<@__device_1>} = #flow.parameter.named<"model"::"blk.0.attn_output.weight:d_rows"> : tensor<512xf32>
// CHECK: util.global private @"blk.0.ffn_down.weight:d_rows$dev1" {{.+}} : tensor<512xf32>

// The row-split kernel (q: n 512 rows -> 256 per device, with 256 row scales each).
// CHECK-LABEL: util.func private @halo_fp8_matmul_rows_n512_k512_out_dtypef16.tp2.0(
// CHECK-SAME:    tensor<256x512xf8E4M3FNUZ>, %{{.+}}: tensor<256x512xf8E4M3FNUZ>, %{{.+}}: tensor<f32>, %{{.+}}: tensor<f32>, %{{.+}}: tensor<256xf32>, %{{.+}}: tensor<256xf32>) -> (tensor<?x256xf16>, tensor<?x256xf16>)
// CHECK-NOT:     flow.tensor.transfer
// CHECK:         util.return

// The column-split kernel (attn_output: K 512 -> 256 per device, all 512 row scales).
// CHECK-LABEL: util.func private @halo_fp8_matmul_rows_n512_k512_out_dtypef16.tp2.1(
// CHECK-SAME:    %[[X0:.+]]: tensor<?x256xf8E4M3FNUZ>, %[[X1:.+]]: tensor<?x256xf8E4M3FNUZ>, %[[W0:.+]]: tensor<512x256xf8E4M3FNUZ>, %[[W1:.+]]: tensor<512x256xf8E4M3FNUZ>, %[[XS0:.+]]: tensor<f32>, %[[XS1:.+]]: tensor<f32>, %[[D0:.+]]: tensor<512xf32>, %[[D1:.+]]: tensor<512xf32>)
// CHECK-NOT:     flow.tensor.transfer
// CHECK:         %[[P0:.+]] = linalg.matmul {{.+}} ins(%[[X0]], %[[W0]] :
// CHECK:         %[[P1:.+]] = linalg.matmul {{.+}} ins(%[[X1]], %[[W1]] :
// CHECK-NOT:     flow.tensor.transfer
// CHECK:         %[[S0:.+]] = linalg.generic {{.+}} ins(%[[P0]], %[[XS0]], %[[D0]] : tensor<?x512xf32>, tensor<f32>, tensor<512xf32>) outs(%{{.+}} : tensor<?x512xf16>)
// CHECK:         %[[S1:.+]] = linalg.generic {{.+}} ins(%[[P1]], %[[XS1]], %[[D1]] : tensor<?x512xf32>, tensor<f32>, tensor<512xf32>) outs(%{{.+}} : tensor<?x512xf16>)
// CHECK-NOT:     flow.tensor.transfer
// CHECK:         util.return %[[S0]], %[[S1]]

// REPORT: decode_bs1: 9 transfers, 2 all-reduces (2 one-shot;
