"""Emission: determinism, the public API in a caller's context, the big presets verify."""

import pytest

from conftest import FULL, halo
from halo_mlir.params.names import fp8_param_entries
from halo_mlir import EmitOptions, emit_module, preset


@pytest.mark.parametrize("extra", [[], ["--layer-loop", "--tp", "2"], ["--dtype", "fp8", "--tp", "2"]],
                         ids=["unrolled", "loop-tp2", "fp8-tp2"])
def test_same_inputs_give_byte_identical_ir(tmp_path, extra):
    a, b = tmp_path / "a.mlir", tmp_path / "b.mlir"
    for out in (a, b):
        halo("emit", "--model", "8b", "--layers", "2", "--bs-prefill", "1,4", *extra, "-o", out)
    assert a.read_bytes() == b.read_bytes()


def test_emit_in_callers_context():
    from iree.compiler import ir

    ctx = ir.Context()
    module = emit_module(preset("toy").with_layers(1), EmitOptions(bs_prefill=(1,),
                         bs_decode=(2,)), context=ctx)
    assert module.context is ctx
    names = [op.attributes["sym_name"].value for op in module.body.operations
             if op.operation.name == "util.func"]
    kernels = [n for n in names if n.startswith("halo_")]  # templated kernels, once each
    assert [n for n in names if n not in kernels] == [
        "prefill_bs1$impl", "prefill_bs1$layer0", "prefill_bs1$async", "prefill_bs1",
        "decode_bs2$impl", "decode_bs2$layer0", "decode_bs2$async", "decode_bs2"]
    assert [k.split("_dtype")[0] for k in kernels] == ["halo_paged_prefill_attention",
                                                       "halo_paged_decode_attention"]
    # The caller can keep working on it in its own context.
    with ctx:
        assert module.operation.verify()


def test_bytecode_output_roundtrips(tmp_path):
    from iree.compiler import ir

    out = tmp_path / "m.mlirbc"
    halo("emit", "--model", "toy", "--layers", "1", "-o", out)
    with ir.Context():
        m = ir.Module.parse(out.read_bytes())
        assert "decode_bs4" in str(m)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["405b", "70b", "8b"] if FULL else ["405b"])
def test_big_presets_emit_and_verify(model):
    """The whole 405B program (126 layers, prefill + decode, bs 4) builds and verifies."""
    module = emit_module(preset(model), EmitOptions())
    with module.context:
        assert module.operation.verify()
        text = str(module)
    assert text.count("blk.125.ffn_down.weight") >= (1 if model == "405b" else 0)
    assert "tensor<?x8257536xf16>" in text or model != "405b"  # page_elems of 405B


def test_fp8_module_reads_fp8_parameters_and_cache():
    """--dtype fp8: every block linear reads `KEY:qs` (f8E4M3FNUZ) with its scales, the cache
    argument is fp8, logits stay f16; exactly the keys of fp8_param_entries."""
    import re

    from halo_mlir.quantization import fp8
    from halo_mlir.api import module_text

    cfg = preset("toy")
    module = emit_module(cfg, EmitOptions(dtype="fp8", bs_prefill=(1,), bs_decode=(1,)))
    with module.context:
        text = module_text(module, locations=False)
    keys = set(re.findall(r'#flow.parameter.named<"model"::"([^"]+)">', text))
    assert keys == set(fp8_param_entries(cfg))
    assert 'blk.3.ffn_down.weight:qs"> : tensor<512x1024xf8E4M3FNUZ>' in text
    impl = next(line for line in text.splitlines() if "@prefill_bs1$impl(" in line)
    assert "%arg3: tensor<?x262144xf8E4M3FNUZ>" in impl  # the cache: [pages, page_elems]
    assert "-> (tensor<1x?x1024xf16>" in impl  # logits


@pytest.mark.parametrize("extra", [[], ["--layer-loop"], ["--tp", "2"]],
                         ids=["unrolled", "loop", "tp2"])
def test_fp8_per_channel_module_reads_row_scales(tmp_path, extra):
    """--fp8-scales per-channel: the keys of fp8_param_entries(cfg, "per-channel") (stacked
    / sharded as the plan says), every linear through fp8_matmul_rows with a [out] f32
    scale; the per-tensor module of the same options is unchanged by the flag's existence
    (no `d_rows`, only fp8_matmul)."""
    import re

    from halo_mlir import preset

    from halo_mlir.quantization import fp8
    from halo_mlir.params.names import stacked_key

    pc, pt = tmp_path / "pc.mlir", tmp_path / "pt.mlir"
    halo("emit", "--model", "toy", "--layers", 2, "--dtype", "fp8", "--fp8-scales",
         "per-channel", "--bs-prefill", 1, "--bs-decode", 1, *extra, "-o", pc)
    halo("emit", "--model", "toy", "--layers", 2, "--dtype", "fp8", "--bs-prefill", 1,
         "--bs-decode", 1, *extra, "-o", pt)
    text, tensor_text = pc.read_text(), pt.read_text()
    cfg = preset("toy").with_layers(2)
    keys = set(re.findall(r'#flow.parameter.named<"model"::"([^"]+)">', text))
    want = set(fp8_param_entries(cfg, "per-channel"))
    if "--layer-loop" in extra:
        want = {stacked_key(k) or k for k in want}
    if "--tp" in extra:
        keys = {re.sub(r"\.shard\.\d+$", "", k) for k in keys}
    assert keys == want
    assert "halo_fp8_matmul_rows_" in text and "halo_fp8_matmul_n" not in text
    assert "d_rows" not in tensor_text and "fp8_matmul_rows" not in tensor_text
    if "--tp" in extra:  # q's row scales split with its rows, down's whole on each device
        assert '"blk.0.attn_q.weight:d_rows.shard.1"> : tensor<256xf32>' in text
        assert '"blk.0.ffn_down.weight:d_rows"> : tensor<512xf32>' in text
    elif "--layer-loop" in extra:
        assert '"blk.ffn_up.weight.stacked:d_rows"> : tensor<2x1024xf32>' in text
    else:
        assert '"blk.1.attn_k.weight:d_rows"> : tensor<512xf32>' in text


@pytest.mark.parametrize("kwargs,message", [
    (dict(dtype="fp8", fp8_scales="per-row"), "unknown --fp8-scales 'per-row'"),
    (dict(fp8_scales="per-channel"), "--fp8-scales applies to --dtype fp8 only"),
    (dict(kv_cache_dtype="fp8"), "needs --dtype fp8"),
    (dict(dtype="fp8", kv_cache_dtype="f32"), "holds fp8 or the activation dtype"),
    (dict(fp8_activations="f32"), "applies to --dtype fp8 only"),
    (dict(dtype="fp8", weight_formats=(("blk.0.attn_q.weight", "q8_0"),)), "drop --keep-quantized"),
])
def test_fp8_option_errors(kwargs, message):
    from halo_mlir.errors import HaloError

    with pytest.raises(HaloError, match=message):
        EmitOptions(**kwargs)


def test_attention_operands_must_share_a_dtype():
    """The emit-time check behind "qkv must have same data type": an f16 query over fp8
    keys is rejected when the op is built, naming the operands."""
    from halo_mlir.errors import HaloError
    from halo_mlir.ir_builder import Builder
    from halo_mlir.ops.attention import attention_fused

    b = Builder()
    with b.context, b.at("test"):
        b.new_module()
        q, k = b.tensor_type([1, 4, 2, 2, 16], "f16"), b.tensor_type([1, 2, 4, 16], "f8E4M3FNUZ")
        pos, lens = b.tensor_type([1, 4], "i64"), b.tensor_type([1], "i64")
        with b.function("f", [q, k, k, pos, lens], [q], private=True) as args:
            with pytest.raises(HaloError, match="q f16, k f8E4M3FNUZ, v f8E4M3FNUZ"):
                attention_fused(b, *args, dtype="f16")
            b.ret(args[0])
