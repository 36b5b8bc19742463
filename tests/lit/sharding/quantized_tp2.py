# RUN: %python %s | %FileCheck %s
# Tests that kept-quantized weights shard like their matrices at TP2 (hidden 512 = two
# Q4_K super-blocks a row, FFN 320): the row-split attn_output's Q4_K fields split on their
# block dimension (one super-block per device, every field alike), the column-split
# ffn_gate's Q6_K fields on their rows (160 each), and the kernels are cloned at the local
# sizes, one contraction per device on its own shard.
from halo_mlir.api import module_text
from halo_mlir.config import from_hf_dict
from halo_mlir.model.decoder import EmitOptions, emit_module
from halo_mlir.sharding_passes.pipeline import shard_module

# CHECK-DAG: util.global private @"blk.0.attn_output.weight:d.shard.1" {stream.affinity = #hal.device.promise<@__device_1>} = #flow.parameter.named<"model"::"blk.0.attn_output.weight:d.shard.1"> : tensor<512x1xf16>
# CHECK-DAG: util.global private @"blk.0.attn_output.weight:sc.shard.0" {{.+}} : tensor<512x1x8xi8>
# CHECK-DAG: util.global private @"blk.0.attn_output.weight:m.shard.1" {{.+}} : tensor<512x1x8xi8>
# CHECK-DAG: util.global private @"blk.0.attn_output.weight:qs.shard.1" {{.+}} : tensor<512x1x4x32xi8>
# CHECK-DAG: util.global private @"blk.0.ffn_gate.weight:sc.shard.1" {{.+}} : tensor<160x2x16xi8>
# CHECK-DAG: util.global private @"blk.0.ffn_gate.weight:ql.shard.0" {{.+}} : tensor<160x2x2x64xi8>
# CHECK-DAG: util.global private @"blk.0.ffn_gate.weight:qh.shard.1" {{.+}} : tensor<160x2x2x32xi8>

# CHECK-LABEL: util.func private @halo_q4_k_matmul_n512_k512.tp2.{{[0-9]+}}(
# CHECK-SAME:    %[[X0:.+]]: tensor<?x256xf32>, %[[X1:.+]]: tensor<?x256xf32>, %[[D0:.+]]: tensor<512x1xf16>, %[[D1:.+]]: tensor<512x1xf16>, %{{.+}}: tensor<512x1xf16>, %{{.+}}: tensor<512x1xf16>, %{{.+}}: tensor<512x1x8xi8>, %{{.+}}: tensor<512x1x8xi8>, %{{.+}}: tensor<512x1x8xi8>, %{{.+}}: tensor<512x1x8xi8>, %[[QS0:.+]]: tensor<512x1x4x32xi8>, %[[QS1:.+]]: tensor<512x1x4x32xi8>) -> (tensor<?x512xf32>, tensor<?x512xf32>)
# CHECK:         %[[XB0:.+]] = tensor.expand_shape %[[X0]] {{.+}} output_shape [%{{.+}}, 1, 4, 2, 32]
# CHECK:         %[[XB1:.+]] = tensor.expand_shape %[[X1]] {{.+}} output_shape [%{{.+}}, 1, 4, 2, 32]
# CHECK:         linalg.generic {{.+}} ins(%[[XB0]], %[[D0]], %{{.+}}, %{{.+}}, %{{.+}}, %[[QS0]] :
# CHECK:         linalg.generic {{.+}} ins(%[[XB1]], %[[D1]], %{{.+}}, %{{.+}}, %{{.+}}, %[[QS1]] :

# CHECK-LABEL: util.func private @halo_q6_k_matmul_n320_k512.tp2.{{[0-9]+}}(
# CHECK-SAME:    tensor<?x512xf32>, %{{.+}}: tensor<?x512xf32>, %{{.+}}: tensor<160x2xf16>, %{{.+}}: tensor<160x2xf16>, %{{.+}}: tensor<160x2x16xi8>, %{{.+}}: tensor<160x2x16xi8>, %{{.+}}: tensor<160x2x2x64xi8>, %{{.+}}: tensor<160x2x2x64xi8>, %{{.+}}: tensor<160x2x2x32xi8>, %{{.+}}: tensor<160x2x2x32xi8>) -> (tensor<?x160xf32>, tensor<?x160xf32>)
cfg = from_hf_dict(dict(vocab_size=40, hidden_size=512, intermediate_size=320,
                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                        rms_norm_eps=1e-5, max_position_embeddings=256, rope_theta=10000.0,
                        tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
                        model_type="llama"))
opts = EmitOptions(bs_prefill=(1,), bs_decode=(1,), dtype="f32",
                   weight_formats=(("blk.0.attn_output.weight", "q4_k"),
                                   ("blk.0.ffn_gate.weight", "q6_k")))
module = emit_module(cfg, opts)
shard_module(module, 2)
with module.context:
    print(module_text(module, locations=False))
