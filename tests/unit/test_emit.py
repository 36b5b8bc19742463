"""Emission: determinism, the public API in a caller's context, the big presets verify."""

import pytest

from conftest import FULL, halo
from halo_mlir import EmitOptions, emit_module, preset


@pytest.mark.parametrize("extra", [[], ["--layer-loop", "--tp", "2"]], ids=["unrolled", "loop-tp2"])
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
