"""Every attention form and dtype we emit compiles for gfx942 (MI300X), and prefill
matmuls use MFMA (the S-divisibility hint at work). Runs on CPU: only the compiler."""

import re

import pytest

from conftest import halo

CASES = [("fused", "f16"), ("decomposed", "f16"), ("fused", "bf16")]


@pytest.mark.parametrize("attention,dtype", CASES)
def test_compiles_for_gfx942_with_mfma(tmp_path, attention, dtype):
    mlir, vmfb, dump = tmp_path / "m.mlir", tmp_path / "m.vmfb", tmp_path / "dump"
    halo("emit", "--model", "toy", "--layers", 1, "--attention", attention, "--dtype", dtype,
         "--bs-prefill", "1,4", "--bs-decode", "1,4", "-o", mlir)
    halo("compile", mlir, "--target", "gfx942", "-o", vmfb,
         f"--flag=--iree-hal-dump-executable-files-to={dump}")
    assert vmfb.stat().st_size > 0
    isa = "".join(p.read_text() for p in dump.glob("*.rocmasm"))
    mfma = re.findall(r"v_mfma_f32_\w+", isa)
    assert mfma, "no MFMA instruction in the gfx942 ISA"
