# RUN: %python %s paged_decode_attention dtype=f16 batch=4 kv_heads=8 group=4 head_dim=128 stride=32 layers=32 | %FileCheck %s --check-prefix=DECODE
# RUN: %python %s paged_decode_attention dtype=bf16 batch=1 kv_heads=3 group=3 head_dim=64 stride=16 layers=2 | %FileCheck %s --check-prefix=DECODE-BF16
# RUN: %python %s paged_decode_attention_fp8 dtype=f16 batch=2 kv_heads=8 group=4 head_dim=128 stride=32 layers=32 | %FileCheck %s --check-prefix=DECODE-FP8
# RUN: %python %s paged_prefill_attention dtype=f32 batch=2 kv_heads=2 group=3 head_dim=16 stride=8 layers=3 | %FileCheck %s --check-prefix=PREFILL
# Tests that the paged attention kernels render to mangled functions that read the layer's
# pages with iree_linalg_ext.gather (rows (page, layer, k/v), the kv-head dim a slice dim;
# decode takes the rows as arguments, computed by the caller for every layer at once, so
# the kernel has no index math of its own;
# decode attends over the gathered pages as they are, keys (page, slot): no transpose),
# index K/V per kv head (GQA: no repeat), mask keys by seq_lens (decode) or causal +
# padding (prefill), softmax-scale by 1/sqrt(D) in f32, and (prefill) scatter the new K/V
# into the whole cache with unique indices.
import sys

from lit_util import print_kernel

# DECODE-DAG:   #[[K_MAP:.+]] = affine_map<(d0, d1, d2, d3, d4, d5, d6, d7) -> (d0, d5, d1, d6, d4)>
# DECODE-DAG:   #[[MASK_MAP:.+]] = affine_map<(d0, d1, d2, d3, d4, d5, d6, d7) -> (d0, d3, d5, d6)>
# DECODE-LABEL: util.func private @halo_paged_decode_attention_dtypef16_batch4_kv_heads8_group4_head_dim128_stride32_layers32(
# DECODE-SAME:    %[[Q:.+]]: tensor<4x8x4x128xf16>, %[[CACHE:.+]]: tensor<?x32x2x8x32x128xf16>, %[[KROWS:.+]]: tensor<4x?x3xi64>, %[[VROWS:.+]]: tensor<4x?x3xi64>, %[[LENS:.+]]: tensor<4xi64>) -> tensor<4x8x4x128xf16>
# DECODE-NOT:     linalg.generic
# DECODE:         %[[K:.+]] = iree_linalg_ext.gather dimension_map = [0, 1, 2] ins(%[[CACHE]], %[[KROWS]] : tensor<?x32x2x8x32x128xf16>, tensor<4x?x3xi64>) outs(%{{.+}} : tensor<4x?x8x32x128xf16>)
# DECODE-NOT:     linalg.transpose
# DECODE:         %[[V:.+]] = iree_linalg_ext.gather dimension_map = [0, 1, 2] ins(%[[CACHE]], %[[VROWS]]
# DECODE:         %[[MASK:.+]] = linalg.generic {{.+}} ins(%[[LENS]] : tensor<4xi64>) outs(%{{.+}} : tensor<4x1x?x32xi1>)
# DECODE:           arith.cmpi slt
# DECODE:         %[[Q5:.+]] = tensor.expand_shape %[[Q]] {{.+}} into tensor<4x8x4x1x128xf16>
# DECODE:         %[[SCALE:.+]] = arith.constant 0.0883883461 : f32
# DECODE:         %[[OUT:.+]] = iree_linalg_ext.attention <indexing_maps = [#{{.+}}, #[[K_MAP]], #{{.+}}, #{{.+}}, #[[MASK_MAP]], #{{.+}}]>
# DECODE-SAME:      ins(%[[Q5]], %[[K]], %[[V]], %[[SCALE]], %[[MASK]] : tensor<4x8x4x1x128xf16>, tensor<4x?x8x32x128xf16>, tensor<4x?x8x32x128xf16>, f32, tensor<4x1x?x32xi1>)
# DECODE:           iree_linalg_ext.yield %{{.+}} : f32
# DECODE:         %[[RES:.+]] = tensor.collapse_shape %[[OUT]] {{.+}} into tensor<4x8x4x128xf16>
# DECODE:         util.return %[[RES]]

# DECODE-BF16-LABEL: util.func private @halo_paged_decode_attention_dtypebf16_batch1_kv_heads3_group3_head_dim64_stride16_layers2(
# DECODE-BF16-SAME:    tensor<1x3x3x64xbf16>, %{{.+}}: tensor<?x2x2x3x16x64xbf16>
# DECODE-BF16:         arith.constant 1.250000e-01 : f32
# DECODE-BF16:         iree_linalg_ext.attention {{.+}} outs(%{{.+}} : tensor<1x3x3x1x64xbf16>)

# DECODE-FP8-LABEL: util.func private @halo_paged_decode_attention_fp8_dtypef16_batch2_kv_heads8_group4_head_dim128_stride32_layers32(
# DECODE-FP8-SAME:    %{{.+}}: tensor<2x8x4x128xf16>, %[[CACHE:.+]]: tensor<?x32x2x8x32x128xf8E4M3FNUZ>, %{{.+}}: tensor<2x?x3xi64>, %{{.+}}: tensor<2x?x3xi64>, %{{.+}}: tensor<2xi64>, %[[KS:.+]]: f32, %[[VS:.+]]: f32) -> tensor<2x8x4x128xf16>
# DECODE-FP8:         iree_linalg_ext.gather dimension_map = [0, 1, 2] ins(%[[CACHE]], {{.+}} outs(%{{.+}} : tensor<2x?x8x32x128xf8E4M3FNUZ>)
# DECODE-FP8:         %[[K:.+]] = linalg.generic {{.+}} outs(%{{.+}} : tensor<2x8x?x128xf16>)
# DECODE-FP8:           %[[WIDE:.+]] = arith.extf %{{.+}} : f8E4M3FNUZ to f32
# DECODE-FP8:           arith.truncf %[[WIDE]] : f32 to f16
# DECODE-FP8:         %[[SCALE:.+]] = arith.mulf %[[KS]], %{{.+}} : f32
# DECODE-FP8:         %[[ACC:.+]] = iree_linalg_ext.attention {{.+}} ins(%{{.+}}, %[[K]], %{{.+}}, %[[SCALE]], %{{.+}} : {{.+}}) outs(%{{.+}} : tensor<2x8x4x1x128xf32>)
# DECODE-FP8:         linalg.generic {{.+}} ins(%[[ACC]] :
# DECODE-FP8:           arith.mulf %{{.+}}, %[[VS]] : f32

# PREFILL-DAG:   #[[KB_MAP:.+]] = affine_map<(d0, d1, d2, d3, d4, d5, d6, d7) -> (d0, d1, d5, d6, d4)>
# PREFILL-DAG:   #[[MASKB_MAP:.+]] = affine_map<(d0, d1, d2, d3, d4, d5, d6, d7) -> (d0, d3, d6, d5)>
# PREFILL-LABEL: util.func private @halo_paged_prefill_attention_dtypef32_batch2_kv_heads2_group3_head_dim16_stride8_layers3(
# PREFILL-SAME:    %[[Q:.+]]: tensor<2x?x2x3x16xf32>, %[[K:.+]]: tensor<2x2x?x16xf32>, %[[V:.+]]: tensor<2x2x?x16xf32>, %[[LENS:.+]]: tensor<2xi64>, %[[CACHE:.+]]: tensor<?x3x2x2x8x16xf32>, %[[PAGES:.+]]: tensor<2x?xi64>, %[[LAYER:.+]]: i64) -> (tensor<2x?x2x3x16xf32>, tensor<?x3x2x2x8x16xf32>)
# PREFILL:         %[[KB:.+]] = tensor.expand_shape %[[K]] {{.+}} into tensor<2x2x?x8x16xf32>
# PREFILL:         %[[KUPD:.+]] = tensor.collapse_shape {{.+}} into tensor<?x2x8x16xf32>
# PREFILL:         %[[KROWS:.+]] = tensor.collapse_shape {{.+}} into tensor<?x3xi64>
# PREFILL:         %[[C1:.+]] = iree_linalg_ext.scatter dimension_map = [0, 1, 2] unique_indices(true) ins(%[[KUPD]], %[[KROWS]] : tensor<?x2x8x16xf32>, tensor<?x3xi64>) outs(%[[CACHE]] : tensor<?x3x2x2x8x16xf32>)
# PREFILL:         %[[VB:.+]] = tensor.expand_shape %[[V]]
# PREFILL:         %[[C2:.+]] = iree_linalg_ext.scatter {{.+}} outs(%[[C1]] : tensor<?x3x2x2x8x16xf32>)
# PREFILL:         %[[MASK:.+]] = linalg.generic {{.+}} ins(%[[LENS]] : tensor<2xi64>) outs(%{{.+}} : tensor<2x?x8x?xi1>)
# PREFILL:           %[[STRIDE:.+]] = arith.constant 8 : i64
# PREFILL:           %[[JT:.+]] = arith.muli %{{.+}}, %[[STRIDE]] : i64
# PREFILL:           %[[T:.+]] = arith.addi %[[JT]], %{{.+}} : i64
# PREFILL:           %[[CAUSAL:.+]] = arith.cmpi sle, %[[T]]
# PREFILL:           %[[INSIDE:.+]] = arith.cmpi slt
# PREFILL:           arith.andi %[[CAUSAL]], %[[INSIDE]] : i1
# PREFILL:         %[[QT:.+]] = linalg.transpose ins(%[[Q]] {{.+}} permutation = [0, 2, 3, 1, 4]
# PREFILL:         %[[OUT:.+]] = iree_linalg_ext.attention <indexing_maps = [#{{.+}}, #[[KB_MAP]], #{{.+}}, #{{.+}}, #[[MASKB_MAP]], #{{.+}}]> ins(%[[QT]], %[[KB]], %[[VB]], %{{.+}}, %[[MASK]] : {{.+}}, tensor<2x2x?x8x16xf32>, tensor<2x2x?x8x16xf32>, f32, tensor<2x?x8x?xi1>)
# PREFILL:         %[[RES:.+]] = linalg.transpose ins(%[[OUT]] {{.+}} permutation = [0, 3, 1, 2, 4]
# PREFILL:         util.return %[[RES]], %[[C2]]
print_kernel(sys.argv[1:])
