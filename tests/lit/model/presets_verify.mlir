// RUN: %halo emit --model 405b -o %t.405b.mlirbc
// RUN: %iree-opt %t.405b.mlirbc -o %t.405b.verified.mlirbc --emit-bytecode
// RUN: %halo emit --model 8b --dtype bf16 --attention decomposed --bs-prefill 1 --bs-decode 1,8 -o %t.8b.mlir
// RUN: %iree-opt %t.8b.mlir -o %t.8b.verified.mlir
// RUN: %FileCheck %s --input-file=%t.8b.verified.mlir
// Tests that the big presets emit modules that IREE's own parser and verifier accept,
// including every dtype and attention form, and that the 8B cache page has
// 32 layers * 2 * 8 kv heads * 32 * 128 = 2097152 bf16 elements.

// CHECK: util.func public @prefill_bs1(
// CHECK: util.func private @decode_bs8$impl({{.+}}tensor<?x2097152xbf16> {halo.kv_cache = array<i64: 32, 2, 8, 32, 128>}) -> (tensor<8x1x128256xbf16>, tensor<?x2097152xbf16>)
