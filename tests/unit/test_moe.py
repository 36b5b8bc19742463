"""Mixtral (mixture of experts): config, parameter names and import, emission, errors, and
the MoE block's numerics against transformers' own MixtralSparseMoeBlock."""

import dataclasses
import json

import numpy as np
import pytest

from conftest import halo
from test_cli_errors import assert_one_line_error

from halo_mlir.config import PRESETS, from_hf_dict
from halo_mlir.errors import HaloError

# The config.json of mistralai/Mixtral-8x7B-v0.1.
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
    "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "num_local_experts": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 1e6, "router_aux_loss_coef": 0.02, "sliding_window": None,
    "tie_word_embeddings": False, "vocab_size": 32000,
}
TINY = {**MIXTRAL_8X7B, "hidden_size": 32, "intermediate_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
        "num_local_experts": 3, "num_experts_per_tok": 2}


def test_presets():
    rows = {"mixtral-8x7b": (4096, 32, 32, 14336, 32000), "mixtral-8x22b": (6144, 56, 48, 16384, 32768)}
    for name, (hidden, layers, heads, ffn, vocab) in rows.items():
        c = PRESETS[name]
        assert (c.hidden_size, c.n_layers, c.n_heads, c.ffn_dim, c.vocab_size) == \
            (hidden, layers, heads, ffn, vocab)
        assert (c.family, c.n_experts, c.experts_per_token, c.moe_renormalize) == \
            ("mixtral", 8, 2, True)
        assert (c.n_kv_heads, c.head_dim, c.rope_theta, c.rms_eps, c.rope_scaling) == \
            (8, 128, 1e6, 1e-5, None)
    assert PRESETS["8b"].family == "llama" and not PRESETS["8b"].is_moe


def test_hf_config_equals_preset():
    c, p = from_hf_dict(MIXTRAL_8X7B), PRESETS["mixtral-8x7b"]
    for f in ("hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
              "vocab_size", "rope_theta", "rms_eps", "rope_scaling", "tie_embeddings",
              "family", "n_experts", "experts_per_token", "moe_renormalize", "max_seq_len"):
        assert getattr(c, f) == getattr(p, f), f


@pytest.mark.parametrize("change,message", [
    (dict(num_experts_per_tok=9), r"num_experts_per_tok 9 \(experts a token runs\) is not in "
                                  r"1..num_local_experts \(8\); fix config.json"),
    (dict(num_experts_per_tok=0), r"num_experts_per_tok 0 .* is not in 1..num_local_experts"),
    (dict(num_local_experts=0), "needs n_experts >= 1"),
    (dict(sliding_window=4096), "sliding_window 4096 is not supported"),
    (dict(model_type="grok"), "model_type 'grok' is not a Llama-family model or Mixtral"),
])
def test_bad_hf_config(change, message):
    with pytest.raises(HaloError, match=message):
        from_hf_dict({**MIXTRAL_8X7B, **change})


def test_parameter_names_and_shapes():
    from halo_mlir.params.names import block_weights, hf_sources, param_shapes

    cfg = from_hf_dict(TINY)
    shapes = param_shapes(cfg)
    assert shapes["blk.1.ffn_gate_inp.weight"] == (3, 32)
    assert shapes["blk.1.ffn_gate_exps.weight"] == (3, 24, 32)
    assert shapes["blk.1.ffn_up_exps.weight"] == (3, 24, 32)
    assert shapes["blk.1.ffn_down_exps.weight"] == (3, 32, 24)
    assert not any(".ffn_gate.weight" in k or ".ffn_down.weight" in k for k in shapes)
    assert block_weights(cfg)[-4:] == ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps",
                                       "ffn_down_exps")
    assert hf_sources("blk.1.ffn_gate_inp.weight", cfg) == \
        ["model.layers.1.block_sparse_moe.gate.weight"]
    assert hf_sources("blk.1.ffn_down_exps.weight", cfg) == \
        [f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight" for e in range(3)]
    assert hf_sources("blk.0.attn_q.weight", cfg) == ["model.layers.0.self_attn.q_proj.weight"]


def _tiny_checkpoint(d, drop=None, hf=TINY):
    from safetensors.numpy import save_file

    from halo_mlir.params.names import hf_sources, param_shapes

    cfg = from_hf_dict(hf)
    rng = np.random.default_rng(0)
    tensors = {}
    for key, shape in param_shapes(cfg).items():
        names = hf_sources(key, cfg)
        for name in names:
            tensors[name] = rng.standard_normal(shape[1:] if len(names) > 1 else shape
                                                ).astype(np.float32)
    if drop:
        del tensors[drop]
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(hf))
    return tensors


def test_import_stacks_the_experts(tmp_path):
    """Each layer's experts become one [experts, ...] entry, expert e at index e
    (w1 -> ffn_gate_exps, w3 -> ffn_up_exps, w2 -> ffn_down_exps), read back from the IRPA."""
    from test_layout import entries

    tensors = _tiny_checkpoint(tmp_path)
    out = tmp_path / "m.irpa"
    halo("import-params", "--safetensors", tmp_path, "--dtype", "f32", "-o", out)
    written = entries(out)

    def read(key, shape):
        return written[key].reshape(shape)

    for key, kind in (("ffn_gate_exps", "w1"), ("ffn_up_exps", "w3"), ("ffn_down_exps", "w2")):
        want = np.stack([tensors[f"model.layers.1.block_sparse_moe.experts.{e}.{kind}.weight"]
                         for e in range(3)])
        got = read(f"blk.1.{key}.weight", want.shape)
        np.testing.assert_array_equal(got, want)
    router = tensors["model.layers.0.block_sparse_moe.gate.weight"]
    np.testing.assert_array_equal(read("blk.0.ffn_gate_inp.weight", router.shape), router)


def test_import_names_a_missing_expert(tmp_path):
    _tiny_checkpoint(tmp_path, drop="model.layers.1.block_sparse_moe.experts.2.w3.weight")
    out = tmp_path / "m.irpa"
    proc = halo("import-params", "--safetensors", tmp_path, "-o", out, check=False)
    assert_one_line_error(proc, "experts.2.w3.weight", "blk.1.ffn_up_exps.weight")
    assert not out.exists()


def test_emission_is_deterministic_and_verifies(tmp_path):
    """The Mixtral 8x7B preset (2 layers) emits the same bytes twice, and IREE's parser and
    verifier accept it (iree-opt), with the stacked expert globals."""
    import subprocess
    import sys
    from pathlib import Path

    a, b = tmp_path / "a.mlir", tmp_path / "b.mlir"
    for out in (a, b):
        halo("emit", "--model", "mixtral-8x7b", "--layers", "2", "--bs-prefill", "1,4", "-o", out)
    assert a.read_bytes() == b.read_bytes()
    opt = Path(sys.executable).with_name("iree-opt")
    proc = subprocess.run([str(opt), str(a), "-o", str(tmp_path / "v.mlir")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = a.read_text()
    assert '"model"::"blk.1.ffn_gate_exps.weight"> : tensor<8x14336x4096xf16>' in text
    assert '"model"::"blk.1.ffn_down_exps.weight"> : tensor<8x4096x14336xf16>' in text
    assert '"model"::"blk.1.ffn_gate_inp.weight"> : tensor<8x4096xf16>' in text


@pytest.mark.parametrize("args,needles", [
    (["--dtype", "fp8", "--tp", "2", "--moe-parallel", "expert"],
     ["--moe-parallel expert does not run fp8 experts yet", "--moe-parallel ffn"]),
])
def test_unsupported_options_are_one_line_errors(tmp_path, args, needles):
    out = tmp_path / "x.mlir"
    proc = halo("emit", "--model", "mixtral-8x7b", "--layers", "1", *args, "-o", out,
                check=False)
    assert_one_line_error(proc, *needles)
    assert not out.exists()


def test_plan_accounts_the_experts(tmp_path):
    """plan holds every expert's weights and counts all of Mixtral 8x7B's parameters
    (46.7B, computed here from the HF config's shapes)."""
    c = from_hf_dict(MIXTRAL_8X7B)
    h, f, e = c.hidden_size, c.ffn_dim, c.n_experts
    layer = 2 * h + h * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * h \
        + e * h + 3 * e * f * h
    params = 2 * c.vocab_size * h + h + c.n_layers * layer
    proc = halo("plan", "--model", "mixtral-8x7b", "--json")
    assert json.loads(proc.stdout)["params"] == params


# ---- Mixtral from a GGUF (llama.cpp's layout: arch `llama`, expert metadata) ----------
def _tiny_gguf(d, name="m.gguf", hf=TINY, **kw):
    """`hf`'s random weights as safetensors (config.json beside) and as a llama.cpp GGUF."""
    from moe_gguf import write_mixtral_gguf

    tensors = _tiny_checkpoint(d, hf=hf)
    write_mixtral_gguf(d / name, tensors, hf, **kw)
    return d / name


@pytest.mark.parametrize("per_expert,form", [
    (False, []), (True, []), (True, ["--tp", "2", "--layout", "stacked"]),
    (True, ["--tp", "2", "--moe-parallel", "expert"])])
def test_gguf_imports_and_emits_as_the_checkpoint(tmp_path, per_expert, form):
    """A Mixtral GGUF (stacked `_exps` tensors, or the older one tensor per expert) imports
    to the same IRPA entries as the HF checkpoint it was converted from (Q/K rows
    un-permuted, experts stacked in order; also over 2 ranks in the stacked layout, and
    with whole experts per rank, `--moe-parallel expert`),
    and emits the same program as its config.json (the model's name aside, which the
    program does not hold)."""
    from test_layout import entries

    hf = {**TINY, "num_local_experts": 4} if "expert" in form else TINY  # 2 whole a device
    gguf_path = _tiny_gguf(tmp_path, per_expert=per_expert, hf=hf)
    halo("import-params", "--gguf", gguf_path, "--dtype", "f32", *form, "-o", tmp_path / "g.irpa")
    halo("import-params", "--safetensors", tmp_path, "--dtype", "f32", *form,
         "-o", tmp_path / "s.irpa")
    tp = int(form[1]) if form else 1
    files = [f"g.rank{r}.irpa" for r in range(tp)] if form else ["g.irpa"]
    for name in files:
        got, want = entries(tmp_path / name), entries(tmp_path / name.replace("g.", "s.", 1))
        assert sorted(got) == sorted(want) and any("ffn_down_exps" in k for k in got)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    emit_form = [a if a != "--layout" else "--layer-loop" for a in form if a != "stacked"]
    halo("emit", "--gguf", gguf_path, "--dtype", "f32", *emit_form, "-o", tmp_path / "g.mlir")
    halo("emit", "--hf-config", tmp_path / "config.json", "--dtype", "f32", *emit_form,
         "-o", tmp_path / "s.mlir")
    assert (tmp_path / "g.mlir").read_text() == (tmp_path / "s.mlir").read_text()


def test_gguf_config_reads_the_expert_metadata(tmp_path):
    from halo_mlir.params.gguf_file import GgufFile

    with GgufFile(_tiny_gguf(tmp_path)) as g:
        c = g.config()
    assert (c.family, c.n_experts, c.experts_per_token, c.moe_renormalize, c.ffn_dim) == \
        ("mixtral", 3, 2, True, 24)
    assert c.rms_eps == pytest.approx(1e-5, rel=1e-6)  # GGUF stores it as f32
    assert c == dataclasses.replace(from_hf_dict(TINY), name=c.name, rms_eps=c.rms_eps)


def _gate(shape):
    return np.zeros(shape, np.float32)


# (what the GGUF writer changes, what the one-line error says)
BAD_GGUF = [
    (dict(metadata={"expert_count": 4}),
     ["llama.expert_count = 4 disagrees with blk.0.ffn_gate_exps.weight, which holds 3 experts"]),
    (dict(metadata={"expert_used_count": 4}),
     ["llama.expert_used_count = 4 (experts a token runs) is not in 1..llama.expert_count = 3"]),
    (dict(metadata={"expert_used_count": None}), ["llama.expert_used_count is missing"]),
    (dict(drop=("blk.1.ffn_down_exps.weight",)),
     ["without blk.1.ffn_down_exps.weight or blk.1.ffn_down.0.weight: an unknown expert layout",
      "ffn_{gate,up,down}_exps"]),
    (dict(replace={"blk.0.ffn_gate_exps.weight": _gate((3, 32, 24))}),  # [E, D, F]: transposed
     ["blk.0.ffn_gate_exps.weight has shape [3, 32, 24], not [experts, ffn, hidden] = [3, 24, 32]",
      "unknown expert layout"]),
    (dict(replace={"blk.0.ffn_up_exps.weight": _gate((3 * 24, 32))}),  # 2-D: experts flattened
     ["blk.0.ffn_up_exps.weight has shape [72, 32], not [experts, ffn, hidden]"]),
    (dict(drop=("blk.0.ffn_gate_inp.weight",)), ["without the router blk.0.ffn_gate_inp.weight"]),
    (dict(per_expert=True, drop=("blk.1.ffn_up.1.weight",)),
     ["per-expert tensors of blk.1.ffn_up_exps.weight are experts [0, 2], not 0..1"]),
]


@pytest.mark.parametrize("change,needles", BAD_GGUF)
@pytest.mark.parametrize("command", ["import-params", "emit"])
def test_bad_moe_gguf_is_a_one_line_error(tmp_path, change, needles, command):
    """A Mixtral GGUF whose metadata and expert tensors disagree, or whose experts are in a
    layout halo_mlir does not read, is refused in one line by import and emit, and nothing
    is written."""
    gguf_path = _tiny_gguf(tmp_path, **change)
    out = tmp_path / ("x.irpa" if command == "import-params" else "x.mlir")
    proc = halo(command, "--gguf", gguf_path, "-o", out, check=False)
    assert_one_line_error(proc, *needles)
    assert not out.exists()


def test_expert_tensors_without_expert_count(tmp_path):
    gguf_path = _tiny_gguf(tmp_path, metadata={"expert_count": None, "expert_used_count": None})
    proc = halo("emit", "--gguf", gguf_path, "-o", tmp_path / "x.mlir", check=False)
    assert_one_line_error(proc, "has expert tensors (blk.0.ffn_gate_exps.weight) but no "
                                "llama.expert_count")


def test_top_k_above_the_experts_in_hf_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "num_experts_per_tok": 4}))
    for cmd in (["emit", "--hf-config", tmp_path / "config.json", "-o", tmp_path / "x.mlir"],
                ["plan", "--hf-config", tmp_path / "config.json"]):
        proc = halo(*cmd, check=False)
        assert_one_line_error(proc, "num_experts_per_tok 4 (experts a token runs) is not in "
                                    "1..num_local_experts (3); fix config.json")
    assert not (tmp_path / "x.mlir").exists()


def test_tp2_splits_each_experts_ffn_rows(tmp_path):
    """--tp 2: gate/up experts split along ffn rows, down along its ffn columns, the router
    replicated (one global per device), and the emission verifies."""
    out = tmp_path / "tp2.mlir"
    proc = halo("emit", "--model", "mixtral-8x7b", "--layers", "1", "--tp", "2", "-o", out)
    text = out.read_text()
    for i in range(2):
        assert f'"model"::"blk.0.ffn_gate_exps.weight.shard.{i}"> : tensor<8x7168x4096xf16>' in text
        assert f'"model"::"blk.0.ffn_up_exps.weight.shard.{i}"> : tensor<8x7168x4096xf16>' in text
        assert f'"model"::"blk.0.ffn_down_exps.weight.shard.{i}"> : tensor<8x4096x7168xf16>' in text
    assert text.count('"model"::"blk.0.ffn_gate_inp.weight"> : tensor<8x4096xf16>') == 2
    assert "ffn_gate_inp.weight.shard" not in text
    # one all-reduce per layer and entry (attention output, experts): 2 per entry here
    assert "prefill_bs4: " in proc.stderr and "2 all-reduces" in proc.stderr


def test_import_tp2_stacked_splits_each_expert(tmp_path):
    """`import-params --tp 2 --layout stacked`: device r holds rows [r*F/2, (r+1)*F/2) of
    every expert's gate (and the same columns of down) of every layer; the router is
    stored once (replicated)."""
    import iree.runtime as rt

    tensors = _tiny_checkpoint(tmp_path)
    halo("import-params", "--safetensors", tmp_path, "--dtype", "f32", "--tp", 2,
         "--layout", "stacked", "-o", tmp_path / "s.irpa")
    f, half = TINY["intermediate_size"], TINY["intermediate_size"] // 2
    for r in range(2):
        index = rt.ParameterIndex()
        index.load(str(tmp_path / f"s.rank{r}.irpa"))
        got = {k: np.frombuffer(memoryview(v.file_view), np.float32) for k, v in index.items()}
        assert ("blk.ffn_gate_inp.weight.stacked" in got) == (r == 0)
        gate = got[f"blk.ffn_gate_exps.weight.stacked.shard.{r}"].reshape(2, 3, half, 32)
        down = got[f"blk.ffn_down_exps.weight.stacked.shard.{r}"].reshape(2, 3, 32, half)
        for layer in range(2):
            for e in range(3):
                w1 = tensors[f"model.layers.{layer}.block_sparse_moe.experts.{e}.w1.weight"]
                w2 = tensors[f"model.layers.{layer}.block_sparse_moe.experts.{e}.w2.weight"]
                np.testing.assert_array_equal(gate[layer, e], w1[r * half:(r + 1) * half])
                np.testing.assert_array_equal(down[layer, e], w2[:, r * half:(r + 1) * half])
        assert f == 2 * half


@pytest.mark.parametrize("release,form", [("3.13", "grouped"), ("3.9", "gather")])
def test_export_shortfin_moe_prefill_form(tmp_path, monkeypatch, release, form):
    """export-shortfin compiles a mixture of experts with the grouped prefill, except under
    IREE 3.9 (shortfin's), whose grouped form computes wrong logits after a prefill's first
    position: there it emits the gather form and says so (compiled by a stand-in here; the
    served tokens are checked in tests/e2e/test_moe_shortfin.py)."""
    from pathlib import Path

    from tokenizers import Tokenizer, models

    import halo_mlir.toolchain.compile
    import halo_mlir.export
    import halo_mlir.model.decoder
    from halo_mlir.toolchain import compat
    from halo_mlir.export import export_shortfin

    _tiny_checkpoint(tmp_path)
    Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token="a")).save(
        str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    halo("import-params", "--safetensors", tmp_path, "--dtype", "f32", "-o", tmp_path / "m.irpa")
    monkeypatch.setattr(compat, "current", lambda: compat.TABLE[release])
    monkeypatch.setattr(halo_mlir.export, "check_release", lambda: None)
    monkeypatch.setattr(halo_mlir.toolchain.compile, "compile_file",
                        lambda src, dst, **_: Path(dst).write_bytes(b"vmfb"))
    emitted, emit = [], halo_mlir.model.decoder.emit_module
    monkeypatch.setattr(halo_mlir.model.decoder, "emit_module",
                        lambda cfg, opts: emitted.append(opts) or emit(cfg, opts))
    notes = []
    export_shortfin(tmp_path / "out", hf_config=str(tmp_path / "config.json"),
                    params=str(tmp_path / "m.irpa"), target="cpu", echo=notes.append)
    assert [o.moe_prefill for o in emitted] == [form]
    assert any("gather form" in str(n) for n in notes) == (form == "gather")


def test_bad_moe_gguf_in_generate_and_export_shortfin(tmp_path):
    """generate and export-shortfin check the experts before importing or compiling: one
    line, no cache entry, no output directory."""
    import os
    import subprocess
    import sys

    def tokenizer(w):  # a gpt2-kind vocabulary, so generate gets past its tokenizer
        w.add_tokenizer_model("gpt2")
        w.add_token_list([chr(ord("0") + i) for i in range(TINY["vocab_size"] - 1)] + ["01"])
        w.add_token_merges(["0 1"])
        w.add_eos_token_id(1)

    gguf_path = _tiny_gguf(tmp_path, metadata={"expert_count": 4}, extra=tokenizer)
    needle = "llama.expert_count = 4 disagrees with blk.0.ffn_gate_exps.weight"
    cache = tmp_path / "cache"
    env = {**os.environ, "HALO_CACHE_DIR": str(cache)}
    for args in (["generate", "--gguf", gguf_path, "--prompt", "hi"],
                 ["export-shortfin", "--gguf", gguf_path, "--out", tmp_path / "served"]):
        proc = subprocess.run([sys.executable, "-m", "halo_mlir", *map(str, args)],
                              capture_output=True, text=True, env=env)
        assert_one_line_error(proc, needle)
    assert not (cache / "params").exists() and not (cache / "modules").exists()
    assert not (tmp_path / "served").exists()


def test_import_reads_transformers_fused_experts(tmp_path):
    """A checkpoint in transformers' in-memory layout (`mlp.experts.gate_up_proj` [E, 2F, D],
    `mlp.experts.down_proj`, `mlp.gate`: what `save_file(model.state_dict())` writes) imports
    to the same parameters as `save_pretrained`'s one-tensor-per-expert layout."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file
    from test_layout import entries

    hf = transformers.MixtralConfig(hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    num_local_experts=3, num_experts_per_tok=2,
                                    vocab_size=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(hf)
    legacy, fused = tmp_path / "legacy", tmp_path / "fused"
    model.save_pretrained(legacy, safe_serialization=True)
    state = model.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state  # the layout under test
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(fused / "model.safetensors"))
    (fused / "config.json").write_text((legacy / "config.json").read_text())
    written = {}
    for d in (legacy, fused):
        out = tmp_path / f"{d.name}.irpa"
        halo("import-params", "--safetensors", d, "--dtype", "f32", "-o", out)
        written[d.name] = entries(out)
    assert written["legacy"].keys() == written["fused"].keys()
    for key, value in written["legacy"].items():
        np.testing.assert_array_equal(written["fused"][key], value, err_msg=key)
    # and the halves are where transformers' forward takes them: gate rows first
    gate_up = state["model.layers.1.mlp.experts.gate_up_proj"].numpy()
    np.testing.assert_array_equal(
        written["fused"]["blk.1.ffn_up_exps.weight"].reshape(3, 24, 32), gate_up[:, 24:])


def test_moe_block_calls_the_routing_grouping_and_expert_kernels(tmp_path):
    """The router's top-k, the grouped prefill's counting sort and the float decode
    contraction are the moe_topk / moe_group / expert_matmul kernels; at --tp 2 the expert
    kernel's callee takes each device's half of the experts' rows (gate/up) and columns
    (down), and the routing kernels take replicated inputs."""
    out = tmp_path / "tp2.mlir"
    halo("emit", "--model", "mixtral-8x7b", "--layers", "1", "--bs-prefill", "4", "--tp", "2",
         "-o", out)
    funcs = [line for line in out.read_text().splitlines()
             if line.lstrip().startswith("util.func private @halo_")]
    by = {name: [f for f in funcs if f"@halo_{name}_" in f]
          for name in ("moe_topk", "moe_group", "expert_matmul")}
    assert [len(v) for v in by.values()] == [1, 1, 2], funcs
    assert "(%arg0: tensor<?x8xf32>, %arg1: tensor<?x8xf32>)" in by["moe_topk"][0]
    assert "-> (tensor<?xi64>, tensor<?xi64>, tensor<?xi64>, tensor<?xi64>, tensor<8xi64>" \
        in by["moe_group"][0]
    gate_up, down = sorted(by["expert_matmul"], key=lambda f: "slots" not in f)
    assert "_slots2.tp2" in gate_up and gate_up.count("tensor<8x7168x4096xf16>") == 2
    assert "-> (tensor<?x2x7168xf16>, tensor<?x2x7168xf16>)" in gate_up
    assert down.count("tensor<8x4096x7168xf16>") == 2
    assert "-> (tensor<?x4096xf16>, tensor<?x4096xf16>)" in down


def test_topk_reference_breaks_ties_to_the_lower_expert():
    import numpy as np

    from halo_mlir.kernels.moe import topk_reference

    p = np.array([[0.25, 0.5, 0.25, 0.5]], np.float32)
    w, ids = topk_reference({"k": 3, "renormalize": 0}, [p])
    assert ids.tolist() == [[1, 3, 0]] and w.tolist() == [[0.5, 0.5, 0.25]]
    w, _ = topk_reference({"k": 2, "renormalize": 1}, [p])
    assert w.tolist() == [[0.5, 0.5]]
