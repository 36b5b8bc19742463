// RUN: %halo emit --model toy --layers 2 --bs-prefill 1,4 --bs-decode 4 -o %t.mlir
// RUN: %FileCheck %s --input-file=%t.mlir
// RUN: %iree-opt %t.mlir -o %t.verified.mlir
// Tests that the emitted program has docs/ABI.md's functions: prefill_bs{N}/decode_bs{N} with the
// coarse-fences $async variant, i64 token/length/page arguments, a dynamic f16 cache of
// page_elems = layers * 2 * kv_heads * stride * head_dim = 2 * 2 * 8 * 32 * 64 = 65536,
// imported with `consume` and aliased back (in-place update), and parameters as globals.

// CHECK: util.global private @token_embd.weight = #flow.parameter.named<"model"::"token_embd.weight"> : tensor<1024x512xf16>
// CHECK: util.global private @blk.0.attn_q.weight = #flow.parameter.named<"model"::"blk.0.attn_q.weight"> : tensor<512x512xf16>
// CHECK: util.global private @blk.1.ffn_down.weight = #flow.parameter.named<"model"::"blk.1.ffn_down.weight"> : tensor<512x1024xf16>
// CHECK: util.global private @output_norm.weight
// CHECK: util.global private @output.weight = #flow.parameter.named<"model"::"output.weight"> : tensor<1024x512xf16>
// CHECK-NOT: util.global

// CHECK-LABEL: util.func private @prefill_bs1$impl(
// CHECK-SAME:    tensor<1x?xi64>, %{{.+}}: tensor<1xi64>, %{{.+}}: tensor<1x?xi64>, %{{.+}}: tensor<?x65536xf16> {halo.kv_cache = array<i64: 2, 2, 8, 32, 64>})
// CHECK-SAME:    -> (tensor<1x?x1024xf16>, tensor<?x65536xf16>)
// CHECK-SAME:    attributes {halo.divisors = array<i64: 0, 1, 32>, halo.entry = "prefill_bs1", halo.inplace = array<i64: 3>}

// CHECK-LABEL: util.func public @prefill_bs1$async(
// CHECK-SAME:    %[[TOKENS:[a-z0-9]+]]: !hal.buffer_view, %{{.+}}: !hal.buffer_view, %{{.+}}: !hal.buffer_view, %[[CACHE:[a-z0-9]+]]: !hal.buffer_view, %[[WAIT:[a-z0-9]+]]: !hal.fence, %[[SIGNAL:[a-z0-9]+]]: !hal.fence) -> !hal.buffer_view
// CHECK-SAME:    iree.abi.model = "coarse-fences"
// CHECK:         %[[CACHE_T:.+]] = hal.tensor.import wait(%[[WAIT]]) => consume %[[CACHE]] : !hal.buffer_view -> tensor<?x65536xf16>
// CHECK:         %[[RESULTS:.+]]:2 = util.call @prefill_bs1$impl(
// CHECK:         %[[ALIASED:.+]] = hal.tensor.alias wait(%[[WAIT]]) => %[[RESULTS]]#1 : tensor<?x65536xf16>{%{{.+}}} to %[[CACHE]] : !hal.buffer_view
// CHECK:         %[[READY:.+]]:2 = hal.tensor.barrier join(%[[ALIASED]], %[[RESULTS]]#0 : tensor<?x65536xf16>, tensor<1x?x1024xf16>) => %[[SIGNAL]] : !hal.fence
// CHECK:         hal.tensor.export %[[READY]]#1 : tensor<1x?x1024xf16>

// CHECK-LABEL: util.func public @prefill_bs1(
// CHECK:         hal.fence.create
// CHECK:         util.call @prefill_bs1$async(
// CHECK:         hal.fence.await

// CHECK-LABEL: util.func private @prefill_bs4$impl(
// CHECK-SAME:    tensor<4x?xi64>, %{{.+}}: tensor<4xi64>, %{{.+}}: tensor<4x?xi64>, %{{.+}}: tensor<?x65536xf16> {halo.kv_cache
// CHECK-LABEL: util.func public @prefill_bs4$async(
// CHECK-LABEL: util.func public @prefill_bs4(

// CHECK-LABEL: util.func private @decode_bs4$impl(
// CHECK-SAME:    tensor<4x1xi64>, %{{.+}}: tensor<4xi64>, %{{.+}}: tensor<4xi64>, %{{.+}}: tensor<4x?xi64>, %{{.+}}: tensor<?x65536xf16> {halo.kv_cache = array<i64: 2, 2, 8, 32, 64>})
// CHECK-SAME:    -> (tensor<4x1x1024xf16>, tensor<?x65536xf16>)
// CHECK-SAME:    attributes {halo.entry = "decode_bs4", halo.inplace = array<i64: 4>}
// CHECK-LABEL: util.func public @decode_bs4$async(
// CHECK-SAME:    !hal.fence, %{{.+}}: !hal.fence) -> !hal.buffer_view
// CHECK:         hal.tensor.import wait(%{{.+}}) => consume
// CHECK:         hal.tensor.alias
// CHECK-LABEL: util.func public @decode_bs4(
// CHECK-NOT:   util.func
