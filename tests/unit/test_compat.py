"""The IREE release table (halo_mlir/toolchain/compat.py): flags per release, the portable text of the
attention op, and the same emitted text under 3.13 and 3.9 (the 3.9 environment when
present), which both releases compile."""

from __future__ import annotations

import pytest

from conftest import halo, halo_in, shortfin_python
from halo_mlir.toolchain import compat
from halo_mlir.errors import HaloError

NEW = """    %38 = iree_linalg_ext.attention <indexing_maps = [#map1, #map2, #map3, #map4, #map5, #map6]> ins(%q, %k, %v, %cst, %35 : tensor<1x3x3x?x64xf16>, tensor<1x3x?x64xf16>, tensor<1x3x?x64xf16>, f32, tensor<1x?x?xi1>) outs(%37 : tensor<1x3x3x?x64xf16>) {
    ^bb0(%arg16: f32 loc("blk.*.attention")):
      iree_linalg_ext.yield %arg16 : f32 loc(#loc315)
    } -> tensor<1x3x3x?x64xf16> loc(#loc315)
    %c3 = arith.constant 3 : index
"""
OLD = NEW.replace("attention <indexing_maps = [#map1, #map2, #map3, #map4, #map5, #map6]>",
                  "attention {indexing_maps = [#map1, #map2, #map3, #map4, #map5, #map6]}")
GENERIC = """    %38 = "iree_linalg_ext.attention"(%q, %k, %v, %cst, %35, %37) <{indexing_maps = [#map1, #map2, #map3, #map4, #map5, #map6]}> ({
    ^bb0(%arg16: f32 loc("blk.*.attention")):
      iree_linalg_ext.yield %arg16 : f32 loc(#loc315)
    }) : (tensor<1x3x3x?x64xf16>, tensor<1x3x?x64xf16>, tensor<1x3x?x64xf16>, f32, tensor<1x?x?xi1>, tensor<1x3x3x?x64xf16>) -> tensor<1x3x3x?x64xf16> loc(#loc315)
    %c3 = arith.constant 3 : index
"""


@pytest.mark.iree39
def test_release_rows():
    assert compat.for_version("3.9.0rc20251125").release == "3.9"
    assert compat.for_version("3.13.0").release == "3.13"
    with pytest.raises(HaloError, match=r"iree-base-compiler 3\.11\.0 is not supported: "
                                        r"install one of 3\.9\.x, 3\.13\.x"):
        compat.for_version("3.11.0")
    assert compat.current().release == compat.release_of(compat.installed_version())


@pytest.mark.iree39
def test_target_flags_per_release():
    from halo_mlir.toolchain.compile import target_flags

    assert "--iree-hip-target=gfx942" in target_flags("gfx942", compat.TABLE["3.9"])
    assert "--iree-rocm-target=gfx942" in target_flags("gfx942", compat.TABLE["3.13"])
    # CPU: the same flags, plus 3.13's lifted large-vector check (3.9 has none)
    assert target_flags("cpu", compat.TABLE["3.13"]) == \
        target_flags("cpu", compat.TABLE["3.9"]) + ["--iree-llvmcpu-fail-on-large-vector=false"]


@pytest.mark.iree39
def test_attention_text_is_generic_from_either_release():
    assert compat.portable_asm(NEW) == GENERIC
    assert compat.portable_asm(OLD) == GENERIC
    assert compat.portable_asm(GENERIC) == GENERIC  # idempotent


@pytest.mark.iree39
def test_emitted_text_parses_in_the_installed_release(tmp_path):
    from halo_mlir.api import read_module

    halo("emit", "--model", "toy", "--layers", 1, "--bs-prefill", 1, "--bs-decode", 1,
         "-o", tmp_path / "t.mlir")
    text = (tmp_path / "t.mlir").read_text()
    assert '"iree_linalg_ext.attention"(' in text and "iree_linalg_ext.attention <" not in text
    module = read_module(tmp_path / "t.mlir")
    with module.context:
        assert module.operation.verify()


def test_same_text_under_3_9_and_3_13_and_3_9_compiles_it(tmp_path):
    """Emit with this environment's bindings and with the 3.9 environment's: the same bytes;
    3.9's iree-compile compiles what 3.13's bindings printed."""
    python = shortfin_python()
    # fused: what export-shortfin emits under 3.9 for CPU (compat.attention_for); the paged
    # decode kernel overflows 3.9's CPU stack limit (NOTES.md)
    args = ["emit", "--model", "toy", "--layers", 1, "--bs-prefill", "1,4", "--bs-decode", "1,4",
            "--dtype", "f32", "--attention", "fused"]
    halo(*args, "-o", tmp_path / "here.mlir")
    halo_in(python, *args, "-o", tmp_path / "there.mlir")
    assert (tmp_path / "here.mlir").read_bytes() == (tmp_path / "there.mlir").read_bytes()
    halo_in(python, "compile", tmp_path / "here.mlir", "--target", "cpu", "-o", tmp_path / "t.vmfb")
    assert (tmp_path / "t.vmfb").stat().st_size > 0
