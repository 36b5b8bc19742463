"""compile_file: a content-keyed cache (HALO_COMPILE_CACHE) compiles each distinct source
and flags once; a failing iree-compile is one line naming its first error and the file
holding its whole output."""

import subprocess

import pytest

from halo_mlir.errors import HaloError
from halo_mlir.toolchain import compile as tc

MODULE = """func.func @add(%a: tensor<4xf32>, %b: tensor<4xf32>) -> tensor<4xf32> {
  %0 = arith.addf %a, %b : tensor<4xf32>
  return %0 : tensor<4xf32>
}
"""


def test_same_source_compiles_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HALO_COMPILE_CACHE", str(tmp_path / "cache"))
    runs = []
    real = subprocess.run
    monkeypatch.setattr(tc.subprocess, "run", lambda cmd, **kw: runs.append(cmd) or real(cmd, **kw))
    (tmp_path / "a.mlir").write_text(MODULE)
    tc.compile_file(tmp_path / "a.mlir", tmp_path / "a.vmfb", target="cpu", echo=lambda m: None)
    (tmp_path / "b.mlir").write_text(MODULE)  # same content, another file
    tc.compile_file(tmp_path / "b.mlir", tmp_path / "b.vmfb", target="cpu", echo=lambda m: None)
    assert len(runs) == 1
    assert (tmp_path / "a.vmfb").read_bytes() == (tmp_path / "b.vmfb").read_bytes()
    (tmp_path / "c.mlir").write_text(MODULE.replace("addf", "mulf"))  # other content
    tc.compile_file(tmp_path / "c.mlir", tmp_path / "c.vmfb", target="cpu", echo=lambda m: None)
    tc.compile_file(tmp_path / "a.mlir", tmp_path / "d.vmfb", target="cpu",  # other flags
                    extra_flags=["--iree-opt-level=O1"], echo=lambda m: None)
    assert len(runs) == 3


def test_failure_is_one_line_with_the_log_in_a_file(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HALO_COMPILE_CACHE", raising=False)
    src = tmp_path / "bad.mlir"
    src.write_text(MODULE.replace("tensor<4xf32>\n}", "tensor<8xf32>\n}"))  # a type error
    with pytest.raises(HaloError) as e:
        tc.compile_file(src, tmp_path / "bad.vmfb", target="cpu", echo=lambda m: None)
    message = str(e.value)
    assert "\n" not in message and "error:" in message
    log = tmp_path / "bad.vmfb.iree-compile.log"
    assert f"its full output is in {log}" in message
    assert "error:" in log.read_text()
    assert capsys.readouterr().err == ""  # nothing of IREE's output on the terminal
    assert not (tmp_path / "bad.vmfb").exists()
