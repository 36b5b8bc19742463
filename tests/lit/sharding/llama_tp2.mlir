// RUN: %halo emit --model toy --layers 2 --tp 2 --bs-prefill 1 --bs-decode 1 --attention fused --no-locations -o %t.mlir 2> %t.report
// RUN: %FileCheck %s --input-file=%t.mlir
// RUN: %FileCheck %s --input-file=%t.report --check-prefix=REPORT
// RUN: %halo opt %t.mlir --verify-placement -o %t.verified.mlir
// RUN: %iree-opt %t.mlir -o %t.iree.mlir
// RUN: %halo emit --model toy --layers 2 --tp 2 --bs-prefill 1 --bs-decode 1 --attention paged --no-locations -o %t.paged.mlir 2> %t.paged.report
// RUN: %FileCheck %s --input-file=%t.paged.mlir --check-prefix=PAGED
// RUN: %FileCheck %s --input-file=%t.paged.report --check-prefix=REPORT
// Tests that the toy model (8 kv heads, 2 layers) sharded over 2 devices splits q/k/v by
// output rows and attn_output by input columns, keeps norms replicated (one global per
// device, same parameter key), takes one cache argument per device holding 4 kv heads
// (page_elems 65536 / 2) imported and aliased on its own device, scatters K/V blocks of 4
// heads into that device's cache, and all-reduces twice per layer. The layer body is a
// function sharded once (per argument shardings) and called for every layer.

// CHECK: util.global private @blk.0.attn_norm.weight$dev0 {stream.affinity = #hal.device.promise<@__device_0>} = #flow.parameter.named<"model"::"blk.0.attn_norm.weight"> : tensor<512xf16>
// CHECK: util.global private @blk.0.attn_norm.weight$dev1 {stream.affinity = #hal.device.promise<@__device_1>} = #flow.parameter.named<"model"::"blk.0.attn_norm.weight"> : tensor<512xf16>
// CHECK: util.global private @blk.0.attn_q.weight.shard.1 {stream.affinity = #hal.device.promise<@__device_1>} = #flow.parameter.named<"model"::"blk.0.attn_q.weight.shard.1"> : tensor<256x512xf16>
// CHECK: util.global private @blk.0.attn_output.weight.shard.0 {stream.affinity = #hal.device.promise<@__device_0>} = #flow.parameter.named<"model"::"blk.0.attn_output.weight.shard.0"> : tensor<512x256xf16>
// CHECK: util.global private @output.weight.shard.1 {{.+}} : tensor<512x512xf16>

// CHECK-LABEL: util.func private @prefill_bs1$impl(
// CHECK-SAME:    tensor<1x?xi64>, %{{.+}}: tensor<1xi64>, %{{.+}}: tensor<1x?xi64>, %{{.+}}: tensor<?x32768xf16>, %{{.+}}: tensor<?x32768xf16>)
// CHECK-SAME:    -> (tensor<1x?x1024xf16>, tensor<?x32768xf16>, tensor<?x32768xf16>)
// CHECK-SAME:    halo.arg_devices = array<i64: 0, 0, 0, 0, 1>
// CHECK-SAME:    halo.inplace = array<i64: 3, 4>
// CHECK-COUNT-2: util.call @prefill_bs1$layer0.tp2.0(

// CHECK-LABEL: util.func public @prefill_bs1$async(
// CHECK:         hal.tensor.import on(#hal.device.promise<@__device_0>) wait(%{{.+}}) => consume %arg3 : !hal.buffer_view -> tensor<?x32768xf16>
// CHECK:         hal.tensor.import on(#hal.device.promise<@__device_1>) wait(%{{.+}}) => consume %arg4 : !hal.buffer_view -> tensor<?x32768xf16>
// CHECK:         hal.tensor.alias on(#hal.device.promise<@__device_0>) wait(%{{.+}}) => %{{.+}} : tensor<?x32768xf16>{%{{.+}}} to %arg3
// CHECK:         hal.tensor.alias on(#hal.device.promise<@__device_1>) wait(%{{.+}}) => %{{.+}} : tensor<?x32768xf16>{%{{.+}}} to %arg4
// CHECK:         hal.tensor.export on(#hal.device.promise<@__device_0>)

// The layer body, sharded once and called per layer: each device scatters its 4 heads.
// CHECK-LABEL: util.func private @prefill_bs1$layer0.tp2.0(
// CHECK-SAME:    halo.arg_devices = array<i64: 0, 1, 0, 1
// CHECK-COUNT-4: iree_linalg_ext.scatter dimension_map = [0, 1, 2] unique_indices(true) ins(%{{.+}}, %{{.+}} : tensor<?x4x32x64xf16>, tensor<?x3xi64>) outs(%{{.+}} : tensor<?x2x2x4x32x64xf16>)

// CHECK-LABEL: util.func private @decode_bs1$impl(
// CHECK-SAME:    %{{.+}}: tensor<?x32768xf16>, %{{.+}}: tensor<?x32768xf16>)
// CHECK-COUNT-2: util.call @decode_bs1$layer0.tp2.1(
// CHECK-LABEL: util.func private @decode_bs1$layer0.tp2.1(
// CHECK:         iree_linalg_ext.gather dimension_map = [0, 1, 2] ins(%{{.+}}, %{{.+}} : tensor<?x2x2x4x32x64xf16>, tensor<1x?x3xi64>)

// With the paged kernels (the default), the layer function calls each kernel's sharded
// copy (4 kv heads per device): the same transfers, the scatter and gather inside it.
// PAGED-LABEL: util.func private @prefill_bs1$layer0.tp2.0(
// PAGED:         util.call @[[PREFILL:halo_paged_prefill_attention_dtypef16_batch1_kv_heads8_group1_head_dim64_stride32_layers2.tp2.[0-9]+]](
// PAGED:       util.func private @[[PREFILL]](
// PAGED-COUNT-4: iree_linalg_ext.scatter dimension_map = [0, 1, 2] unique_indices(true) ins(%{{.+}}, %{{.+}} : tensor<?x4x32x64xf16>, tensor<?x3xi64>) outs(%{{.+}} : tensor<?x2x2x4x32x64xf16>)
// PAGED-LABEL: util.func private @halo_paged_decode_attention_dtypef16_batch1_kv_heads8_group1_head_dim64_stride32_layers2.tp2.{{[0-9]+}}(
// PAGED:         iree_linalg_ext.gather dimension_map = [0, 1, 2] ins(%{{.+}}, %{{.+}} : tensor<?x2x2x4x32x64xf16>, tensor<1x?x3xi64>)
// PAGED:         iree_linalg_ext.attention

// 2 layers x 2 all-reduces + 3 (or 4) replicated arguments + 1 for the vocab-split
// logits. `auto` reduce-scatters prefill's (its length is dynamic: 4 transfers each at 2
// devices) and one-shots decode's (static and small: 2 transfers each), both in f16.
// REPORT: prefill_bs1: 20 transfers, 4 all-reduces (4 reduce-scatter; --allreduce auto, --allreduce-dtype activation)
// REPORT: decode_bs1: 13 transfers, 4 all-reduces (4 one-shot; --allreduce auto, --allreduce-dtype activation)
