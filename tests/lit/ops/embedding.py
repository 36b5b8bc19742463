# RUN: %python %s | %FileCheck %s
# Tests that the embedding lookup reads whole rows of the table indexed by the i64 tokens.
from lit_util import print_op
from halo_mlir.ops.embedding import embedding

# CHECK-LABEL: util.func public @embedding(
# CHECK-SAME:    %[[TABLE:.+]]: tensor<300x96xf16>, %[[TOKENS:.+]]: tensor<2x?xi64>) -> tensor<2x?x96xf16>
# CHECK:         linalg.generic
# CHECK-SAME:      ins(%[[TOKENS]] : tensor<2x?xi64>)
# CHECK:         ^bb0(%[[TOK:.+]]: i64, %{{.+}}: f16):
# CHECK:           %[[ROW:.+]] = arith.index_cast %[[TOK]] : i64 to index
# CHECK:           %[[COL:.+]] = linalg.index 2 : index
# CHECK:           tensor.extract %[[TABLE]][%[[ROW]], %[[COL]]] : tensor<300x96xf16>
print_op("embedding", [((300, 96), "f16"), ((2, None), "i64")], lambda b, t, x: embedding(b, t, x))
