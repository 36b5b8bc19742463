# RUN: %python %s fp8_matmul n=256 k=512 out_dtype=f16 | %FileCheck %s --check-prefix=MATMUL
# RUN: %python %s fp8_matmul n=64 k=64 out_dtype=f32 | %FileCheck %s --check-prefix=MATMUL-F32
# RUN: %python %s fp8_matmul_rows n=256 k=512 out_dtype=bf16 | %FileCheck %s --check-prefix=ROWS
# RUN: %python %s fp8_attention batch=2 kv_heads=8 group=4 head_dim=128 out_dtype=bf16 | %FileCheck %s --check-prefix=ATTN
# Tests that the FP8 kernels contract f8E4M3FNUZ operands into f32, fold the per-tensor
# scales (matmul: 0-d tensor scales, one multiply by x_scale * w_scale after the
# contraction; attention: q/k
# scales into the softmax scale, the v scale on the f32 output) and cast to the out dtype.
import sys

from lit_util import print_kernel

# MATMUL-LABEL: util.func private @halo_fp8_matmul_n256_k512_out_dtypef16(
# MATMUL-SAME:    %[[X:.+]]: tensor<?x512xf8E4M3FNUZ>, %[[W:.+]]: tensor<256x512xf8E4M3FNUZ>, %[[XS:.+]]: tensor<f32>, %[[WS:.+]]: tensor<f32>) -> tensor<?x256xf16>
# MATMUL:         %[[ACC:.+]] = linalg.fill ins(%{{.+}} : f32) outs(%{{.+}} : tensor<?x256xf32>)
# MATMUL:         %[[PROD:.+]] = linalg.matmul indexing_maps = [#{{.+}}, #{{.+}}, #{{.+}}] ins(%[[X]], %[[W]] : tensor<?x512xf8E4M3FNUZ>, tensor<256x512xf8E4M3FNUZ>) outs(%[[ACC]] : tensor<?x256xf32>)
# MATMUL:         linalg.generic {{.+}} ins(%[[PROD]], %[[XS]], %[[WS]] : tensor<?x256xf32>, tensor<f32>, tensor<f32>) outs(%{{.+}} : tensor<?x256xf16>)
# MATMUL:           %[[SCALE:.+]] = arith.mulf %{{.+}}, %{{.+}} : f32
# MATMUL:           %[[SCALED:.+]] = arith.mulf %{{.+}}, %[[SCALE]] : f32
# MATMUL:           arith.truncf %[[SCALED]] : f32 to f16

# MATMUL-F32-LABEL: util.func private @halo_fp8_matmul_n64_k64_out_dtypef32(
# MATMUL-F32:         arith.mulf
# MATMUL-F32-NOT:     arith.truncf
# MATMUL-F32:         util.return

# ROWS:       #[[ROW:.+]] = affine_map<(d0, d1) -> (d1)>
# ROWS-LABEL: util.func private @halo_fp8_matmul_rows_n256_k512_out_dtypebf16(
# ROWS-SAME:    %[[X:.+]]: tensor<?x512xf8E4M3FNUZ>, %[[W:.+]]: tensor<256x512xf8E4M3FNUZ>, %[[XS:.+]]: tensor<f32>, %[[WS:.+]]: tensor<256xf32>) -> tensor<?x256xbf16>
# ROWS:         %[[PROD:.+]] = linalg.matmul {{.+}} ins(%[[X]], %[[W]] : tensor<?x512xf8E4M3FNUZ>, tensor<256x512xf8E4M3FNUZ>) outs(%{{.+}} : tensor<?x256xf32>)
# ROWS:         linalg.generic {indexing_maps = [#{{.+}}, #{{.+}}, #[[ROW]], #{{.+}}], {{.+}} ins(%[[PROD]], %[[XS]], %[[WS]] : tensor<?x256xf32>, tensor<f32>, tensor<256xf32>) outs(%{{.+}} : tensor<?x256xbf16>)
# ROWS:           %[[SCALE:.+]] = arith.mulf %{{.+}}, %{{.+}} : f32
# ROWS:           %[[SCALED:.+]] = arith.mulf %{{.+}}, %[[SCALE]] : f32
# ROWS:           arith.truncf %[[SCALED]] : f32 to bf16

# ATTN-LABEL: util.func private @halo_fp8_attention_batch2_kv_heads8_group4_head_dim128_out_dtypebf16(
# ATTN-SAME:    %[[Q:.+]]: tensor<2x8x4x?x128xf8E4M3FNUZ>, %[[K:.+]]: tensor<2x8x?x128xf8E4M3FNUZ>, %[[V:.+]]: tensor<2x8x?x128xf8E4M3FNUZ>, %[[LENS:.+]]: tensor<2xi64>, %[[QS:.+]]: f32, %[[KS:.+]]: f32, %[[VS:.+]]: f32) -> tensor<2x8x4x?x128xbf16>
# ATTN:         %[[RSQRT:.+]] = arith.constant 0.0883883461 : f32
# ATTN:         %[[QK:.+]] = arith.mulf %[[QS]], %[[KS]] : f32
# ATTN:         %[[SCALE:.+]] = arith.mulf %[[QK]], %[[RSQRT]] : f32
# ATTN:         %[[ACC:.+]] = iree_linalg_ext.attention {{.+}} ins(%[[Q]], %[[K]], %[[V]], %[[SCALE]], %{{.+}} : {{.+}}) outs(%{{.+}} : tensor<2x8x4x?x128xf32>)
# ATTN:         linalg.generic {{.+}} ins(%[[ACC]] : tensor<2x8x4x?x128xf32>) outs(%{{.+}} : tensor<2x8x4x?x128xbf16>)
# ATTN:           %[[SCALED:.+]] = arith.mulf %{{.+}}, %[[VS]] : f32
# ATTN:           arith.truncf %[[SCALED]] : f32 to bf16
print_kernel(sys.argv[1:])
