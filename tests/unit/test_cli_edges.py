"""The CLI's sharp edges: `--attention auto`, --tp below 1, a missing model source, help
text, unreadable input files, the kernel workbench's streams."""

from __future__ import annotations

import json
import os

import click
import pytest
from click.testing import CliRunner

from conftest import halo
from test_cli_errors import TINY, assert_one_line_error

PRESETS = ("8b", "70b", "405b", "toy")


def cli(*args):
    """In-process `halo-mlir ARGS` (CliRunner): returns the result, stdout and stderr apart."""
    from halo_mlir.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def assert_cli_error(result, *needles):
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def hf_config(d, heads=4, kv_heads=2, head_dim=8, **extra):
    cfg = {**TINY, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
           "hidden_size": heads * head_dim, **extra}
    path = d / f"config_h{heads}_kv{kv_heads}_d{head_dim}.json"
    path.write_text(json.dumps(cfg))
    return path


# ---- --attention auto ------------------------------------------------------------------
def test_auto_picks_fused_where_the_paged_kernels_do_not_fit(tmp_path):
    from halo_mlir.toolchain import compat
    from halo_mlir.config import from_hf_config, preset
    from halo_mlir.model.attention_form import choose
    from halo_mlir.model.decoder import EmitOptions

    small = from_hf_config(hf_config(tmp_path, head_dim=8))
    form, why = choose(small, EmitOptions())
    assert form == "fused" and "head_dim=8 must be a positive multiple of 16" in why, why
    form, why = choose(from_hf_config(hf_config(tmp_path, head_dim=64)), EmitOptions())
    assert form == "paged" and "head_dim 64" in why, why
    assert choose(preset("8b"), EmitOptions(layer_loop=True))[0] == "fused"
    assert choose(preset("8b"), EmitOptions(dtype="fp8"))[0] == "fused"
    # A release without the paged kernels (3.9: CPU stack), or without the fused op for
    # the target (3.9 on gfx942), never gets them.
    old = compat.TABLE["3.9"]
    assert choose(preset("8b"), EmitOptions(), iree=old)[0] == "fused"
    assert choose(preset("8b"), EmitOptions(), target="gfx942", iree=old)[0] == "decomposed"
    assert choose(preset("8b"), EmitOptions(), target="gfx942")[0] == "paged"
    # An fp8 cache: the fused op, except at decode batch 1 with 1-2 query heads per kv
    # head (IREE's CPU codegen fails there): decomposed.
    toy = preset("toy")  # 8 heads, 8 kv heads
    form, why = choose(toy, EmitOptions(dtype="fp8", bs_decode=(1, 4)))
    assert form == "decomposed" and "1 query head(s) per kv head" in why, why
    assert choose(toy, EmitOptions(dtype="fp8", bs_decode=(2, 4)))[0] == "fused"
    assert choose(preset("8b"), EmitOptions(dtype="fp8", bs_decode=(1,)))[0] == "fused"  # 4


def test_emit_auto_says_what_it_picked(tmp_path):
    small, big = hf_config(tmp_path, head_dim=8), hf_config(tmp_path, head_dim=64)
    proc = halo("emit", "--hf-config", small, "--layers", 1, "-o", tmp_path / "a.mlir")
    picked = [ln for ln in proc.stderr.splitlines() if ln.startswith("--attention auto")]
    assert len(picked) == 1 and picked[0].startswith("--attention auto picked fused: "), \
        proc.stderr
    assert "head_dim=8" in picked[0]
    text = (tmp_path / "a.mlir").read_text()
    assert "iree_linalg_ext.attention" in text and "halo_paged_" not in text
    proc = halo("emit", "--hf-config", big, "--layers", 1, "-o", tmp_path / "b.mlir")
    assert "--attention auto picked paged: " in proc.stderr
    assert "halo_paged_decode_attention" in (tmp_path / "b.mlir").read_text()
    # The explicit form keeps its error and writes nothing.
    out = tmp_path / "p.mlir"
    assert_one_line_error(halo("emit", "--hf-config", small, "--attention", "paged", "-o", out,
                               check=False), "head_dim=8", "--attention fused")
    assert not out.exists()


@pytest.mark.parametrize("model", PRESETS)
def test_auto_equals_paged_on_the_presets(model):
    """The default's output did not change where paged holds (and where `paged` itself
    attends with the fused op: the layer loop, an fp8 cache)."""
    from halo_mlir.api import module_text
    from halo_mlir.config import preset
    from halo_mlir.model.decoder import EmitOptions, emit_module

    cfg = preset(model)
    variants = [{}] if model != "toy" else [{}, {"layer_loop": True}, {"dtype": "fp8"},
                                             {"bs_prefill": (1, 4), "bs_decode": (1, 4)}]
    for extra in variants:
        texts = []
        for form in ("auto", "paged"):
            module = emit_module(cfg, EmitOptions(attention=form, **extra))
            with module.context:
                texts.append(module_text(module))
        assert texts[0] == texts[1], (model, extra)


# ---- --tp --------------------------------------------------------------------------------
TP_COMMANDS = [
    ("emit", "--model", "toy", "-o", "{out}"),
    ("compile", "{mlir}", "-o", "{out}"),
    ("import-params", "--gguf", "{mlir}", "-o", "{out}"),
    ("plan", "--model", "8b"),
    ("cost", "{mlir}"),
    ("export-shortfin", "--gguf", "{mlir}", "--out", "{out}"),
]


@pytest.mark.parametrize("tp", [0, -1])
@pytest.mark.parametrize("command", TP_COMMANDS, ids=lambda c: c[0])
def test_tp_below_one_is_an_error(tmp_path, command, tp):
    mlir, out = tmp_path / "in.mlir", tmp_path / "out"
    mlir.write_text("module {}\n")
    args = [a.format(mlir=mlir, out=out) for a in command]
    result = cli(*args, "--tp", tp)
    assert_cli_error(result, f"--tp must be at least 1", f"got {tp}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mlir"]


def test_tp_error_through_the_real_cli(tmp_path):
    out = tmp_path / "x.mlir"
    assert_one_line_error(halo("emit", "--model", "toy", "--tp", 0, "-o", out, check=False),
                          "--tp must be at least 1")
    assert not out.exists()


# ---- a model source ----------------------------------------------------------------------
def test_emit_and_plan_need_a_model(tmp_path):
    result = cli("emit", "-o", tmp_path / "x.mlir")
    assert_cli_error(result, "no model", "--model PRESET", "8b, 70b, 405b, toy", "--hf-config",
                     "--gguf")
    result = cli("plan")
    assert_cli_error(result, "no model", "8b, 70b, 405b, toy", "--hf-config")
    assert "--gguf" not in result.stderr  # plan has no --gguf
    assert list(tmp_path.iterdir()) == []


# ---- help ------------------------------------------------------------------------------
def _commands(group, path=()):
    for name, cmd in group.commands.items():
        yield (*path, name), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))


def test_help_is_complete():
    from halo_mlir.cli import main

    def truncated(text):  # "[ARGS]..." in the usage line is click's, not a truncation
        return [ln for ln in text.splitlines() if "..." in ln and not ln.startswith("Usage:")]

    top = cli("--help")
    assert top.exit_code == 0 and not truncated(top.output), top.output
    assert "import-params" in top.output and "export-shortfin" in top.output
    flow = top.output.split("Options:")[0]
    order = [flow.index(f"  {c} ") for c in ("import-params", "emit", "compile", "generate")]
    assert order == sorted(order), flow  # the flow, in its order
    missing = []
    for path, cmd in _commands(main):
        if isinstance(cmd, click.Group):
            text = cli(*path, "--help")
            assert text.exit_code == 0 and not truncated(text.output), text.output
        assert cmd.get_short_help_str(limit=45) and not cmd.get_short_help_str(
            limit=45).endswith("..."), path
        missing += [f"{' '.join(path)} {p.opts[-1]}" for p in cmd.params
                    if isinstance(p, click.Option) and not p.help]
    assert not missing, missing


# ---- unreadable files ------------------------------------------------------------------
GARBAGE = b"hello world, not a model"


def _bad_files(d, suffix):
    (d / f"garbage{suffix}").write_bytes(GARBAGE)
    (d / f"empty{suffix}").write_bytes(b"")
    return d / f"garbage{suffix}", d / f"empty{suffix}"


def test_not_a_gguf(tmp_path):
    garbage, empty = _bad_files(tmp_path, ".gguf")
    for args in (["import-params", "-o", tmp_path / "w.irpa"], ["emit", "-o", tmp_path / "x.mlir"]):
        assert_cli_error(cli(*args, "--gguf", garbage),
                         f"{garbage} is not a GGUF file (it starts with 'hello wo'; expected 'GGUF')")
        assert_cli_error(cli(*args, "--gguf", empty), f"{empty} is empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.gguf", "garbage.gguf"]


def test_not_a_safetensors_file(tmp_path):
    garbage, empty = _bad_files(tmp_path, ".safetensors")
    cfg = hf_config(tmp_path)
    for f, needle in ((garbage, "is not a safetensors file (it starts with 'hello wo'"),
                      (empty, "is empty")):
        result = cli("import-params", "--safetensors", f, "--hf-config", cfg,
                     "-o", tmp_path / "w.irpa")
        assert_cli_error(result, f"{f} {needle}")
    assert not (tmp_path / "w.irpa").exists()


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    """What `generate --vmfb` needs besides the module: config.json and a tokenizer."""
    from tokenizers import Tokenizer, models

    d = tmp_path_factory.mktemp("run_inputs")
    halo("emit", "--model", "toy", "--layers", 1, "--bs-prefill", 1, "--bs-decode", 1,
         "-o", d / "m.mlir", "--output-config", d / "config.json")
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(d / "tokenizer.json"))
    return d


@pytest.mark.parametrize("which", ["vmfb", "irpa"])
def test_not_a_vmfb_or_irpa(run_inputs, tmp_path, which):
    garbage, empty = _bad_files(tmp_path, f".{which}")
    good_vmfb = tmp_path / "ok.vmfb"
    good_vmfb.write_bytes(b"PK\x03\x04" + GARBAGE)  # a zip's magic, not a module
    good_irpa = tmp_path / "ok.irpa"
    import iree.runtime as rt
    import numpy as np

    rt.save_archive_file({"output_norm.weight": np.ones(4, np.float32)}, str(good_irpa))
    base = ["--config", run_inputs / "config.json", "--tokenizer",
            run_inputs / "tokenizer.json", "--prompt", "a"]
    for f, needle in ((garbage, "(it starts with 'hello wo'"), (empty, "is empty")):
        pair = ["--vmfb", f, "--params", good_irpa] if which == "vmfb" else \
            ["--vmfb", good_vmfb, "--params", f]
        assert_cli_error(cli("generate", *pair, *base), str(f), needle)
    if which == "vmfb":  # right magic, wrong contents: the runtime's refusal on one line
        assert_cli_error(cli("generate", "--vmfb", good_vmfb, "--params", good_irpa, *base),
                         "not a module this IREE runtime loads", "halo-mlir compile")
    else:  # right magic, wrong contents
        bad = tmp_path / "bad.irpa"
        bad.write_bytes(b"IRPA" + GARBAGE)
        assert_cli_error(cli("generate", "--vmfb", good_vmfb, "--params", bad, *base),
                         "bad.irpa: not a readable parameter file", "import-params")


def test_export_shortfin_checks_its_irpa(tmp_path):
    garbage, empty = _bad_files(tmp_path, ".irpa")
    cfg = hf_config(tmp_path)
    for f, needle in ((garbage, "is not an IRPA parameter file"), (empty, "is empty")):
        out = tmp_path / f"out_{f.stem}"
        assert_cli_error(cli("export-shortfin", "--hf-config", cfg, "--params", f, "--out", out),
                         str(f), needle)
        assert not out.exists()


def test_compile_refuses_the_fp8_attention_cpu_codegen_fails_on(tmp_path):
    """Found by experiment (IREE 3.13): llvm-cpu fails on the fp8 decode attention op at
    batch 1 with 1-2 query heads per kv head; compile says so on one line before running
    iree-compile, and compiles the other batch sizes' modules as before."""
    mlir = tmp_path / "t.mlir"
    halo("emit", "--model", "toy", "--layers", 1, "--dtype", "fp8", "--attention", "fused",
         "--bs-prefill", 1, "--bs-decode", 1, "-o", mlir)
    result = cli("compile", mlir, "--target", "cpu", "-o", tmp_path / "t.vmfb")
    assert_cli_error(result, "fp8 decode attention at batch 1 with 1 query head(s) per kv head",
                     "--attention decomposed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.mlir"]
    from halo_mlir.toolchain.compile import _check_cpu_fp8_attention

    _check_cpu_fp8_attention(mlir, "gfx942")  # other targets compile it


def test_compile_an_empty_module(tmp_path):
    (tmp_path / "e.mlir").write_text("")
    assert_cli_error(cli("compile", tmp_path / "e.mlir", "-o", tmp_path / "e.vmfb"),
                     "e.mlir is empty", "halo-mlir emit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.mlir"]


# ---- the kernel workbench --------------------------------------------------------------
def test_kernel_check_streams():
    """The result on stdout alone; an error on stderr alone."""
    ok = halo("kernel", "check", "paged_decode_attention", "--param", "dtype=f32",
              "--param", "batch=1", "--size", "blocks=1")
    assert ok.stderr == "", ok.stderr
    lines = ok.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paged_decode_attention [") and \
        lines[0].split("tolerance")[1].split()[1] == "ok", ok.stdout
    bad = halo("kernel", "check", "paged_decode_attention", "--param", "head_dim=8",
               check=False)
    assert bad.stdout == "", bad.stdout
    assert_one_line_error(bad, "head_dim=8 must be a positive multiple of 16")
