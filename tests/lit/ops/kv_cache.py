# RUN: %python %s decode | %FileCheck %s --check-prefix=DECODE
# RUN: %python %s prefill | %FileCheck %s --check-prefix=PREFILL
# Tests that the paged cache is viewed as [page, layer, k/v, kv_head, pos, d] (docs/ABI.md), that
# decode reads each row's current page (its K and V blocks of the layer together), merges
# the new K/V at pos % stride and writes it back in one scatter, then gathers whole pages;
# that prefill scatters whole blocks; that every scatter/gather indexes only (page, layer)
# or (page, layer, k/v), so kv heads stay a slice dimension
# (what tensor parallelism splits); that decode computes every layer's rows once
# (`decode_tables`) and a layer takes its slice (no index math per layer); that the gathered
# pages read by attention are kept out
# of the transpose's dispatch by flow.tensor.barrier (a barrier that waits on nothing,
# unlike util.optimization_barrier on a tensor, a host wait); and that the layer index is an
# opaque scalar (one kernel for every layer).
import sys

from lit_util import print_op
from halo_mlir.ops import kv_cache as kv

# DECODE-LABEL: util.func public @decode_kv(
# DECODE-SAME:    %[[CACHE:.+]]: tensor<?x1536xf16>, %[[K:.+]]: tensor<2x2x1x16xf16>, %[[V:.+]]: tensor<2x2x1x16xf16>, %[[PAGES:.+]]: tensor<2x?xi64>, %[[POS:.+]]: tensor<2xi64>)
# DECODE:         %[[VIEW:.+]] = tensor.expand_shape %[[CACHE]] {{\[\[}}0], [1, 2, 3, 4, 5]] output_shape [%{{.+}}, 3, 2, 2, 8, 16]
# DECODE:         %[[READ_ROWS:.+]] = linalg.generic {{.+}} ins(%[[PAGES]] : tensor<2x?xi64>) outs(%{{.+}} : tensor<3x2x2x?x3xi64>)
# DECODE:         %[[PAGE:.+]] = linalg.generic {{.+}} ins(%[[POS]] : tensor<2xi64>)
# DECODE:           arith.divsi %{{.+}}, %c8_i64
# DECODE:           tensor.extract %[[PAGES]]
# DECODE:         %[[ROW_PAGE:.+]] = tensor.expand_shape %[[PAGE]] {{\[\[}}0, 1]] output_shape [2, 1]
# DECODE:         %[[WRITE_ROWS:.+]] = linalg.generic {{.+}} ins(%[[ROW_PAGE]] : tensor<2x1xi64>) outs(%{{.+}} : tensor<3x2x1x2xi64>)
# DECODE:         %[[LAYER:.+]] = util.optimization_barrier %c1_i64 : i64
# DECODE-NOT:     linalg.generic
# DECODE:         %[[AT:.+]] = arith.index_cast %[[LAYER]] : i64 to index
# DECODE:         %[[W_SLICE:.+]] = tensor.extract_slice %[[WRITE_ROWS]][%[[AT]], 0, 0, 0] [1, 2, 1, 2] [1, 1, 1, 1] : tensor<3x2x1x2xi64> to tensor<1x2x1x2xi64>
# DECODE:         %[[BLK_IDX:.+]] = tensor.collapse_shape %[[W_SLICE]] {{\[\[}}0, 1], [2], [3]] : tensor<1x2x1x2xi64> into tensor<2x1x2xi64>
# DECODE:         %[[OLD:.+]] = iree_linalg_ext.gather dimension_map = [0, 1] ins(%[[VIEW]], %[[BLK_IDX]] : tensor<?x3x2x2x8x16xf16>, tensor<2x1x2xi64>) outs(%{{.+}} : tensor<2x1x2x2x8x16xf16>)
# DECODE:         %[[OLD_C:.+]] = tensor.collapse_shape %[[OLD]] {{\[\[}}0, 1], [2], [3], [4], [5]] : tensor<2x1x2x2x8x16xf16> into tensor<2x2x2x8x16xf16>
# DECODE:         %[[NEW_K:.+]] = tensor.collapse_shape %[[K]] {{\[\[}}0], [1, 2], [3]] : tensor<2x2x1x16xf16> into tensor<2x2x16xf16>
# DECODE:         %[[NEW_V:.+]] = tensor.collapse_shape %[[V]] {{\[\[}}0], [1, 2], [3]] : tensor<2x2x1x16xf16> into tensor<2x2x16xf16>
# DECODE:         %[[MERGED:.+]] = linalg.generic {{.+}} ins(%[[OLD_C]], %[[NEW_K]], %[[NEW_V]], %[[POS]] : tensor<2x2x2x8x16xf16>, tensor<2x2x16xf16>, tensor<2x2x16xf16>, tensor<2xi64>)
# DECODE:           arith.remsi %{{.+}}, %c8_i64
# DECODE:           arith.select %{{.+}}, %{{.+}}, %{{.+}} : f16
# DECODE:           arith.select %{{.+}}, %{{.+}}, %{{.+}} : f16
# DECODE:         %[[ROWS:.+]] = tensor.collapse_shape %[[BLK_IDX]] {{\[\[}}0, 1], [2]] : tensor<2x1x2xi64> into tensor<2x2xi64>
# DECODE:         %[[WROTE_V:.+]] = iree_linalg_ext.scatter dimension_map = [0, 1] unique_indices(true) ins(%[[MERGED]], %[[ROWS]] : tensor<2x2x2x8x16xf16>, tensor<2x2xi64>) outs(%[[VIEW]] : tensor<?x3x2x2x8x16xf16>)
# DECODE:         %[[R_SLICE:.+]] = tensor.extract_slice %[[READ_ROWS]][%{{.+}}, 0, 0, 0, 0] [1, 1, 2, %{{.+}}, 3] [1, 1, 1, 1, 1] : tensor<3x2x2x?x3xi64> to tensor<1x1x2x?x3xi64>
# DECODE:         %[[IDX:.+]] = tensor.collapse_shape %[[R_SLICE]] {{\[\[}}0, 1, 2], [3], [4]] : tensor<1x1x2x?x3xi64> into tensor<2x?x3xi64>
# DECODE:         %[[BLOCKS:.+]] = iree_linalg_ext.gather dimension_map = [0, 1, 2] ins(%[[WROTE_V]], %[[IDX]] : tensor<?x3x2x2x8x16xf16>, tensor<2x?x3xi64>) outs(%{{.+}} : tensor<2x?x2x8x16xf16>)
# DECODE:         %[[BARRED:.+]] = flow.tensor.barrier %[[BLOCKS]] : tensor<2x?x2x8x16xf16>{%{{.+}}} on #hal.device.promise<@__device_0>
# DECODE:         %[[T:.+]] = linalg.transpose ins(%[[BARRED]] : {{.+}}) permutation = [0, 2, 1, 3, 4]
# DECODE:         %[[KEYS:.+]] = tensor.collapse_shape %[[T]] {{\[\[}}0], [1], [2, 3], [4]] : tensor<2x2x?x8x16xf16> into tensor<2x2x?x16xf16>
# DECODE:         %[[FLAT:.+]] = tensor.collapse_shape %[[WROTE_V]] {{\[\[}}0], [1, 2, 3, 4, 5]] : tensor<?x3x2x2x8x16xf16> into tensor<?x1536xf16>
# DECODE:         util.return %[[KEYS]], %[[FLAT]]

# PREFILL-LABEL: util.func public @prefill_kv(
# PREFILL-SAME:    %[[CACHE:.+]]: tensor<?x1536xf16>, %[[K:.+]]: tensor<2x2x?x16xf16>, %[[V:.+]]: tensor<2x2x?x16xf16>, %[[PAGES:.+]]: tensor<2x?xi64>)
# PREFILL:         %[[BLK:.+]] = tensor.expand_shape %[[K]] {{\[\[}}0], [1], [2, 3], [4]] output_shape [2, 2, %{{.+}}, 8, 16]
# PREFILL:         %[[T:.+]] = linalg.transpose ins(%[[BLK]] : {{.+}}) permutation = [0, 2, 1, 3, 4]
# PREFILL:         %[[UPD:.+]] = tensor.collapse_shape %[[T]] {{\[\[}}0, 1], [2], [3], [4]] : tensor<2x?x2x8x16xf16> into tensor<?x2x8x16xf16>
# PREFILL:         %[[IDX:.+]] = tensor.collapse_shape %{{.+}} {{\[\[}}0, 1], [2]] : tensor<2x?x3xi64> into tensor<?x3xi64>
# PREFILL:         %[[WROTE_K:.+]] = iree_linalg_ext.scatter dimension_map = [0, 1, 2] unique_indices(true) ins(%[[UPD]], %[[IDX]] : tensor<?x2x8x16xf16>, tensor<?x3xi64>)
# PREFILL:         iree_linalg_ext.scatter dimension_map = [0, 1, 2] unique_indices(true) ins(%{{.+}}, %{{.+}} : tensor<?x2x8x16xf16>, tensor<?x3xi64>) outs(%[[WROTE_K]] :


def decode(b, cache, k, v, pages, pos):
    c6 = kv.cache_view(b, cache, layers=3, kv_heads=2, stride=8, head_dim=16)
    read_rows, write_rows = kv.decode_tables(b, pages, pos, 3, 8)
    layer = b.barrier(b.scalar(1, "i64"))
    c6 = kv.write_position(b, c6, k, v, kv.layer_rows(b, write_rows, layer), pos)
    return (kv.read_pages(b, c6, kv.layer_rows(b, read_rows, layer, 0)), kv.cache_flat(b, c6))


def prefill(b, cache, k, v, pages):
    c6 = kv.cache_view(b, cache, layers=3, kv_heads=2, stride=8, head_dim=16)
    layer = b.barrier(b.scalar(1, "i64"))
    return kv.cache_flat(b, kv.write_blocks(b, c6, k, v, pages, layer))


cache, pages = ((None, 1536), "f16"), ((2, None), "i64")
if sys.argv[1] == "decode":
    kv_t = ((2, 2, 1, 16), "f16")
    print_op("decode_kv", [cache, kv_t, kv_t, pages, ((2,), "i64")], decode)
else:
    kv_t = ((2, 2, None, 16), "f16")
    print_op("prefill_kv", [cache, kv_t, kv_t, pages], prefill)
