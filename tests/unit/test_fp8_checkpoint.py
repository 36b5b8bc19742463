"""Published FP8 checkpoints (compressed-tensors, fbgemm_fp8): the scheme read from
config.json, the e4m3fn -> f8E4M3FNUZ conversion (same bits, doubled scales) checked over
every bit pattern, and `import-params --safetensors` of tiny checkpoints in each layout
(tests/fp8_checkpoints.py) without dequantizing."""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import halo
from test_cli_errors import assert_one_line_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fp8_checkpoints as fc  # noqa: E402

from halo_mlir.errors import HaloError  # noqa: E402
from halo_mlir.params import fp8_checkpoint as fcp  # noqa: E402
from halo_mlir.quantization import fp8  # noqa: E402

LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
ALL = frozenset(f"blk.{i}.{n}.weight" for i in range(fc.LAYERS) for n in LINEARS)
NAMES = ("ct-tensor-static", "ct-channel-static", "ct-channel-dynamic", "fbgemm")
# What each test checkpoint is: (layout, weight scales, input scales, ub, fp8 linears).
EXPECTED = {
    "ct-tensor-static": ("compressed-tensors", "per-tensor", "static", None, ALL),
    "ct-channel-static": ("compressed-tensors", "per-channel", "static", None, ALL),
    "ct-channel-dynamic": ("compressed-tensors", "per-channel", "dynamic", None, ALL),
    "fbgemm": ("fbgemm_fp8", "per-channel", "dynamic", fc.FBGEMM_UB,
               ALL - {f"blk.0.{n}.weight" for n in LINEARS[:4]}),
}


def entries(path) -> dict[str, bytes]:
    import iree.runtime as rt

    index = rt.ParameterIndex()
    index.load(str(path))
    return {key: bytes(memoryview(e.file_view)) for key, e in index.items()}


def cfg_of(hf: dict):
    from halo_mlir.config import from_hf_dict

    return from_hf_dict(hf)


def hf_name(key: str) -> str:
    from halo_mlir.params.names import hf_name as name

    return name(key)


def fn_bits(t) -> np.ndarray:
    import torch

    return t.view(torch.uint8).numpy()


def fnuz_values(data: bytes, shape) -> np.ndarray:
    """f8E4M3FNUZ bytes decoded by torch (independent of the import's numpy view)."""
    import torch

    bits = torch.from_numpy(np.frombuffer(data, np.uint8).copy())
    return bits.view(torch.float8_e4m3fnuz).float().numpy().reshape(shape)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{name: (Fp8Checkpoint, cfg, per-layer import entries)} for every test checkpoint."""
    out = {}
    for name in NAMES:
        d = tmp_path_factory.mktemp(name)
        c = fc.build(d / "ckpt", name)
        halo("import-params", "--safetensors", c.path, "-o", d / "w.irpa")
        out[name] = (c, cfg_of(c.hf_config), entries(d / "w.irpa"))
    return out


# ---- e4m3fn -> f8E4M3FNUZ -----------------------------------------------------------------
def test_every_e4m3fn_bit_pattern_converts_exactly():
    """fnuz(bits') * 2s == fn(bits) * s for all 254 non-NaN bytes and many f32 scales s,
    bits' == bits except -0 (0x80) -> +0; the NaNs (0x7F, 0xFF) are counted, nothing else."""
    import torch

    bits = np.arange(256, dtype=np.uint8)
    nan = np.isin(bits, fp8.FN_NAN)
    assert [fp8.fn_nan_count(bits[i:i + 1]) for i in range(256)] == list(nan.astype(int))
    ok = bits[~nan]
    assert len(ok) == 254
    fn = torch.from_numpy(ok.copy()).view(torch.float8_e4m3fn).float()
    converted = fp8.fnuz_from_fn(ok)
    assert converted.dtype == fp8.numpy_fp8()
    out_bits = converted.view(np.uint8)
    np.testing.assert_array_equal(out_bits, np.where(ok == 0x80, 0, ok))
    fnuz = torch.from_numpy(out_bits.copy()).view(torch.float8_e4m3fnuz).float()
    assert not torch.isnan(fnuz).any() and not torch.isnan(fn).any()
    assert torch.equal(fnuz * 2, fn)  # the grid halves, subnormals included
    assert float(fn.abs().max()) == fp8.FN_MAX and float(fnuz.abs().max()) == 224.0
    rng = np.random.default_rng(0)
    scales = np.concatenate([[1.0, 2.0 ** -20, 3e-7, 1e-3, 1 / 448, 7.5, 1e30],
                             rng.lognormal(-5, 3, 200)]).astype(np.float32)
    s = torch.from_numpy(scales)[:, None]
    left = fnuz[None, :] * (s * 2)  # f32 products
    right = fn[None, :] * s
    assert left.dtype == right.dtype == torch.float32
    assert torch.equal(left, right)
    # the numpy view decodes the same values
    np.testing.assert_array_equal(converted.astype(np.float32), fnuz.numpy())


def test_doubled_input_scale_rounds_to_the_same_bits():
    """A static input scale s doubled: fnuz(x / 2s) has the bits of e4m3fn(x / s) wherever
    e4m3fn does not saturate (|x / s| <= 448; 448 / 2 = 224 < 240). Beyond, e4m3fn
    saturates at 448 while a program clipping at fnuz's 240 keeps 240 (e4m3fn's 480)."""
    import torch

    rng = np.random.default_rng(1)
    s = np.float32(0.0137)
    x = torch.from_numpy((rng.standard_normal(200_000) * 120 * s).astype(np.float32))
    x = torch.cat([x, torch.tensor([448 * s, -448 * s, 2.0 ** -12 * s, 0.0])])
    y = x / s
    fn = y.clamp(-448, 448).to(torch.float8_e4m3fn)
    fnuz = (x / (2 * s)).clamp(-240, 240).to(torch.float8_e4m3fnuz)
    a, b = fn.view(torch.uint8).numpy(), fnuz.view(torch.uint8).numpy()
    inside = (y.abs() <= 448).numpy()
    assert 0 < int((~inside).sum()) < 100 and int((a[inside] == 0x80).sum()) > 0
    np.testing.assert_array_equal(b[inside], np.where(a == 0x80, 0, a)[inside])
    big = fnuz.float().numpy()[~inside]
    assert set(np.abs(big)) <= {224.0, 240.0} and 240.0 in set(np.abs(big))
    # clipped at 224 (e4m3fn's 448) instead, the bits agree everywhere
    fnuz224 = (x / (2 * s)).clamp(-224, 224).to(torch.float8_e4m3fnuz)
    np.testing.assert_array_equal(fnuz224.view(torch.uint8).numpy(), np.where(a == 0x80, 0, a))


# ---- the scheme ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_scheme_of_each_checkpoint(ckpts, name):
    c, cfg, _ = ckpts[name]
    s = fcp.read_scheme(c.hf_config, cfg)
    layout, scales, inputs, ub, keys = EXPECTED[name]
    assert (s.layout, s.weight_scales, s.input_scales, s.activation_scale_ub) == \
        (layout, scales, inputs, ub)
    assert s.fp8_keys == keys
    assert s.float_linears == tuple(sorted(ALL - keys))
    assert s.notes == ()
    # the same from the directory, its config.json and its safetensors file
    for where in (c.path, c.path / "config.json", c.path / "model.safetensors"):
        assert fcp.scheme_from_checkpoint(where) == s
    d = s.as_dict()
    assert d["fp8_keys"] == sorted(keys) and json.loads(json.dumps(d)) == d
    # the checkpoint holds exactly these linears in fp8, with their scales
    import torch

    for key in ALL:
        t = c.tensors[hf_name(key)]
        assert (t.dtype == torch.float8_e4m3fn) == (key in keys), key
        module = hf_name(key).removesuffix(".weight")
        assert (f"{module}.input_scale" in c.tensors) == (key in keys and inputs == "static")
    assert c.tensors["lm_head.weight"].dtype == torch.bfloat16


def test_float_checkpoint_has_no_scheme(tmp_path):
    from test_cli_errors import tiny_checkpoint

    tiny_checkpoint(tmp_path)
    assert fcp.scheme_from_checkpoint(tmp_path) is None


def _hf(layers=2, **qc):
    from hf_reference import AWKWARD

    return {**AWKWARD, "num_hidden_layers": layers, "model_type": "llama",
            "quantization_config": qc}


def _fp8(strategy="tensor", **kw):
    return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy,
            "dynamic": False, **kw}


def _ct(groups, **kw):
    return {"quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": groups, **kw}


STATIC = {"targets": ["Linear"], "weights": _fp8(), "input_activations": _fp8()}


def test_compressed_tensors_targets_and_ignore():
    """ignore by name and regex, regex targets, a preset group, the kv_cache_scheme note."""
    hf = _hf(**_ct({"group_0": STATIC},
                   ignore=["lm_head", "re:.*mlp.down_proj$", "model.layers.1.self_attn.q_proj"],
                   kv_cache_scheme=_fp8()))
    s = fcp.read_scheme(hf, cfg_of(hf))
    assert s.fp8_keys == ALL - {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight",
                                "blk.1.attn_q.weight"}
    assert s.float_linears == ("blk.0.ffn_down.weight", "blk.1.attn_q.weight",
                               "blk.1.ffn_down.weight")
    assert len(s.notes) == 1 and "kv_cache_scheme" in s.notes[0]
    # a regex target selects the attention projections only; lm_head is not a target
    group = {**STATIC, "targets": ["re:.*self_attn\\.(q|k|v|o)_proj$"]}
    hf = _hf(**_ct({"g": group}))
    assert fcp.read_scheme(hf, cfg_of(hf)).fp8_keys == {k for k in ALL if ".attn_" in k}
    # a preset name mapped to its targets (compressed-tensors' shorthand)
    hf = _hf(**_ct({"FP8_DYNAMIC": ["Linear"]}, ignore=["lm_head"]))
    s = fcp.read_scheme(hf, cfg_of(hf))
    assert (s.weight_scales, s.input_scales, s.fp8_keys) == ("per-channel", "dynamic", ALL)
    # a later group naming a module exactly takes it from the class target
    hf = _hf(**_ct({"a": STATIC, "b": {**STATIC, "targets": ["model.layers.0.mlp.up_proj"]}},
                   ignore=["lm_head"]))
    assert fcp.read_scheme(hf, cfg_of(hf)).fp8_keys == ALL


def test_fbgemm_modules_to_not_convert():
    """transformers' matching (prefix at a module boundary, regex, suffix); the 405B-style
    list: first and last blocks, lm_head and every block's attention stay bf16."""
    layers = 4
    skip = ["model.layers.0", f"model.layers.{layers - 1}", "lm_head",
            *(f"model.layers.{i}.self_attn" for i in range(1, layers - 1))]
    hf = _hf(layers, quant_method="fbgemm_fp8", activation_scale_ub=1200.0,
             modules_to_not_convert=skip)
    s = fcp.read_scheme(hf, cfg_of(hf))
    assert s.fp8_keys == {f"blk.{i}.{n}.weight" for i in (1, 2)
                          for n in ("ffn_gate", "ffn_up", "ffn_down")}
    assert len(s.float_linears) == 7 * layers - 6
    hf = _hf(quant_method="fbgemm_fp8", modules_to_not_convert=[
        "model.layers.1", "re:x", "mlp.down_proj", "lm_head"])
    keys = fcp.read_scheme(hf, cfg_of(hf)).fp8_keys
    assert keys == {f"blk.0.{n}.weight" for n in LINEARS if n != "ffn_down"}
    # no list: lm_head stays unconverted (transformers' default); no bound: its default
    hf = _hf(quant_method="fbgemm_fp8")
    s = fcp.read_scheme(hf, cfg_of(hf))
    assert s.fp8_keys == ALL and s.activation_scale_ub == fcp.FBGEMM_DEFAULT_UB == 1200.0
    assert not fcp.fbgemm_skips("model.layers.11.mlp.up_proj", ["model.layers.1"])
    assert fcp.fbgemm_skips("model.layers.1.mlp.up_proj", ["model.layers.1"])


@pytest.mark.parametrize("qc, needle", [
    ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq'"),
    (_ct({"g": {**STATIC, "weights": _fp8(type="int")}}), "weights are int8"),
    (_ct({"g": {**STATIC, "weights": _fp8("group", group_size=128)}}), "group-wise weight"),
    (_ct({"g": {**STATIC, "weights": _fp8("block", block_structure=[128, 128])}}),
     "block-wise weight"),
    (_ct({"g": {**STATIC, "input_activations": _fp8(dynamic=True)}}), "tensor-wise input"),
    (_ct({"g": {"targets": ["Linear"], "weights": _fp8()}}), "weights only"),
    (_ct({"g": STATIC}, format="pack-quantized"), "format 'pack-quantized'"),
    (_ct({"W4A16": ["Linear"]}), "preset W4A16"),
    (_ct({"g": STATIC}, ignore=[]), "fp8 lm_head"),
    (_ct({"a": {**STATIC, "targets": ["re:.*self_attn.*"]},
          "b": {**STATIC, "targets": ["re:.*mlp.*"], "weights": _fp8("channel")}}),
     "mixes weight scales"),
    (_ct({"g": {**STATIC, "targets": ["re:.*embed.*"]}}), "fp8 embeddings"),
    ({"quant_method": "fbgemm_fp8", "modules_to_not_convert": []}, "fp8 lm_head"),
    ({"quant_method": "fbgemm_fp8", "activation_scale_ub": -1}, "activation_scale_ub"),
])
def test_unsupported_schemes_are_one_error(qc, needle):
    hf = _hf(**qc)
    with pytest.raises(HaloError) as e:
        fcp.read_scheme(hf, cfg_of(hf))
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and ("instead" in msg or "fix" in msg or
                                                  "ignore" in msg), msg


def test_moe_checkpoint_is_refused():
    hf = {**_hf(**_ct({"g": STATIC})), "model_type": "mixtral",
          "architectures": ["MixtralForCausalLM"], "num_local_experts": 4,
          "num_experts_per_tok": 2}
    with pytest.raises(HaloError, match="mixture-of-experts .* --quantize fp8"):
        fcp.read_scheme(hf, cfg_of(hf))


# ---- the import ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_import_keeps_the_bits_and_doubles_the_scales(ckpts, name):
    import torch

    c, cfg, got = ckpts[name]
    s = fcp.read_scheme(c.hf_config, cfg)
    want = s.entries(cfg)
    assert list(got) == list(want)
    size = {"float": 2, "f32": 4, fp8.FP8: 1}
    for key, (shape, kind) in want.items():
        assert len(got[key]) == int(np.prod(shape, dtype=np.int64)) * size[kind], key
    assert not any(k.endswith(("q_output:rscale", "kv_cache.quantizer:rscale")) for k in got)
    assert any(k.endswith(":rscale") for k in got) == (s.input_scales == "static")
    neg_zeros = 0
    for key in ALL:
        module = hf_name(key).removesuffix(".weight")
        t = c.tensors[hf_name(key)]
        if key not in s.fp8_keys:  # kept in floats, as KEY in the import's dtype (f16)
            assert f"{key}:qs" not in got
            np.testing.assert_array_equal(
                np.frombuffer(got[key], np.float16).reshape(t.shape),
                t.float().numpy().astype(np.float16))
            continue
        assert key not in got
        qs_key, d_key = fp8.weight_keys(key, s.weight_scales)
        bits = fn_bits(t)
        out = np.frombuffer(got[qs_key], np.uint8).reshape(bits.shape)
        neg_zeros += int((bits == 0x80).sum())
        np.testing.assert_array_equal(out, np.where(bits == 0x80, 0, bits), err_msg=key)
        scale = c.tensors[f"{module}.weight_scale"].float().numpy()
        d = np.frombuffer(got[d_key], np.float32)
        if s.weight_scales == "per-tensor":
            assert d.shape == (1,) and d[0] == 2 * scale.reshape(())
            s_b = scale.reshape(())
        else:
            np.testing.assert_array_equal(d, 2 * scale[:, 0])
            s_b = scale[:, 0:1]
        # elementwise exact: fnuz(qs) * d == e4m3fn(bits) * scale, as the reference decodes
        deq = fnuz_values(got[qs_key], bits.shape) * (d.reshape(()) if d.size == 1 and
                                                      s.weight_scales == "per-tensor"
                                                      else d[:, None])
        ref = t.float().numpy() * s_b
        np.testing.assert_array_equal(deq, ref, err_msg=key)
        np.testing.assert_array_equal(deq, c.dequantized[hf_name(key)].numpy(), err_msg=key)
        if s.input_scales == "static":
            x = c.tensors[f"{module}.input_scale"].float().numpy().reshape(())
            rs = np.frombuffer(got[fp8.input_scale_key(*key.split(".")[1:3])], np.float32)
            assert rs.shape == (1,) and rs[0] == 2 * x, key
    assert neg_zeros > 0  # the planted -0 weights reached the import
    for key in ("token_embd.weight", "output.weight", "blk.1.ffn_norm.weight"):
        t = c.tensors[hf_name(key)]
        assert t.dtype == torch.bfloat16
        np.testing.assert_array_equal(np.frombuffer(got[key], np.float16),
                                      t.float().numpy().astype(np.float16).reshape(-1))


def test_float_tensors_keep_their_bf16_bits(ckpts, tmp_path):
    import torch

    c, cfg, whole = ckpts["fbgemm"]
    halo("import-params", "--safetensors", c.path, "--dtype", "bf16", "-o", tmp_path / "b.irpa")
    got = entries(tmp_path / "b.irpa")
    assert list(got) == list(whole)
    for key in ("blk.0.attn_q.weight", "output.weight", "blk.0.attn_norm.weight"):
        t = c.tensors[hf_name(key)]
        assert got[key] == t.view(torch.int16).numpy().tobytes(), key
    for key in whole:
        if key.endswith((":qs", ":d_rows")):
            assert got[key] == whole[key], key


@pytest.mark.parametrize("name", ["ct-tensor-static", "fbgemm"])
def test_tp2_rank_files(ckpts, name, tmp_path):
    """Split like `--quantize fp8 --tp 2`: fp8 weights and float linears by rows (q, k, v,
    gate, up) or columns (o, down), per-channel scales with their rows or whole in rank 0,
    per-tensor scales and input scales in rank 0."""
    c, cfg, whole = ckpts[name]
    s = fcp.read_scheme(c.hf_config, cfg)
    halo("import-params", "--safetensors", c.path, "--tp", 2, "-o", tmp_path / "w.irpa")
    ranks = [entries(tmp_path / f"w.rank{i}.irpa") for i in range(2)]
    checked = set()
    for key, (shape, kind) in s.entries(cfg).items():
        linear = key.split(".")[2] if key.startswith("blk.") else None
        by_rows = linear in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")
        if len(shape) == 2 and linear in LINEARS:  # a weight, fp8 or float
            full = np.frombuffer(whole[key], np.uint8).reshape(shape[0], -1)
            for i in range(2):
                piece = np.split(full, 2, axis=0 if by_rows else 1)[i]
                assert ranks[i][f"{key}.shard.{i}"] == piece.tobytes(), key
            checked.add("fp8" if kind == fp8.FP8 else "float")
        elif key.endswith(":d_rows") and by_rows:
            full = np.frombuffer(whole[key], np.float32)
            for i in range(2):
                assert ranks[i][f"{key}.shard.{i}"] == np.split(full, 2)[i].tobytes(), key
            checked.add("rows")
        elif kind == "f32":  # per-tensor d, input scales, column-split linears' d_rows
            assert ranks[0][key] == whole[key] and key not in ranks[1], key
            assert not any(k.startswith(key + ".shard") for r in ranks for k in r), key
            checked.add("rank0")
    assert checked >= {"fp8", "rank0"} and ("float" in checked) == (name == "fbgemm")
    assert ("rows" in checked) == (s.weight_scales == "per-channel")


@pytest.mark.parametrize("name", ["ct-channel-static", "ct-channel-dynamic"])
def test_stacked_layout(ckpts, name, tmp_path):
    from halo_mlir.params.names import stacked_key

    c, cfg, whole = ckpts[name]
    halo("import-params", "--safetensors", c.path, "--layout", "stacked", "-o", tmp_path / "s.irpa")
    got = entries(tmp_path / "s.irpa")
    want: dict[str, list[bytes]] = {}
    for key in whole:
        want.setdefault(stacked_key(key) or key, []).append(whole[key])
    assert sorted(got) == sorted(want)
    for key, parts in want.items():
        assert got[key] == b"".join(parts), key
    assert len(got["blk.ffn_up.weight.stacked:d_rows"]) == 4 * fc.LAYERS * cfg.ffn_dim
    static = name.endswith("static")
    assert ("blk.attn_q.q_input.stacked:rscale" in got) == static
    if static:
        halo("import-params", "--safetensors", c.path, "--layout", "stacked", "--tp", 2,
             "-o", tmp_path / "st.irpa")
        ranks = [entries(tmp_path / f"st.rank{i}.irpa") for i in range(2)]
        up = np.frombuffer(got["blk.ffn_up.weight.stacked:d_rows"], np.float32)
        up = up.reshape(fc.LAYERS, -1)
        for i in range(2):
            assert ranks[i]["blk.ffn_up.weight.stacked:d_rows.shard." + str(i)] == \
                np.split(up, 2, axis=1)[i].tobytes()
        assert ranks[0]["blk.ffn_down.weight.stacked:d_rows"] == \
            got["blk.ffn_down.weight.stacked:d_rows"]
        assert ranks[0]["blk.attn_q.q_input.stacked:rscale"] == \
            got["blk.attn_q.q_input.stacked:rscale"]


def test_streaming_in_small_blocks_gives_the_same_file(ckpts, tmp_path, monkeypatch):
    c, cfg, whole = ckpts["ct-channel-static"]
    monkeypatch.setattr(fcp, "BLOCK_BYTES", 1000)  # a few rows a block
    reads: dict[str, int] = {}
    rows = fcp.Fp8File.rows

    def counted(self, name, start, stop):
        reads[name] = reads.get(name, 0) + 1
        return rows(self, name, start, stop)

    monkeypatch.setattr(fcp.Fp8File, "rows", counted)
    calls = []
    fcp.import_fp8_checkpoint(c.path, cfg, fcp.read_scheme(c.hf_config, cfg),
                              tmp_path / "b.irpa", progress=lambda *a: calls.append(a))
    assert entries(tmp_path / "b.irpa") == whole
    assert calls[0][:2] == (0, len(whole)) and calls[-1][:2] == (len(whole),) * 2
    assert reads["model.layers.0.mlp.up_proj.weight"] > 10  # fp8 bits, in blocks
    assert reads["model.embed_tokens.weight"] > 10  # floats, in blocks
    assert reads["model.layers.0.mlp.up_proj.weight_scale"] == 1


# ---- bad input: one line, exit 1, nothing written -------------------------------------------
def _copy(c, dst: Path, edit=None, config_edit=None) -> Path:
    """The checkpoint `c` rewritten into `dst` with `edit(tensors)` applied."""
    from safetensors.torch import save_file

    dst.mkdir()
    tensors = {k: v.clone() for k, v in c.tensors.items()}
    if edit:
        edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    hf = json.loads((c.path / "config.json").read_text())
    if config_edit:
        config_edit(hf)
    (dst / "config.json").write_text(json.dumps(hf))
    return dst


def _nan(tensors):
    import torch

    t = tensors["model.layers.1.mlp.gate_proj.weight"].view(torch.uint8)
    t[7, 3] = 0x7F


@pytest.mark.parametrize("name, edit, config_edit, needles", [
    ("ct-channel-static", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight_scale"),
     None, ["lacks model.layers.1.self_attn.k_proj.weight_scale", "download it again"]),
    ("ct-tensor-static", lambda t: t.pop("model.layers.0.mlp.up_proj.input_scale"), None,
     ["lacks model.layers.0.mlp.up_proj.input_scale"]),
    ("ct-channel-static", lambda t: t.__setitem__(
        "model.layers.0.mlp.down_proj.weight_scale",
        t["model.layers.0.mlp.down_proj.weight_scale"][:48]), None,
     ["model.layers.0.mlp.down_proj.weight_scale has shape [48, 1]", "[96, 1]",
      "config.json this checkpoint's"]),
    ("ct-tensor-static", lambda t: t.__setitem__(
        "model.layers.0.self_attn.v_proj.weight_scale",
        t["model.layers.0.self_attn.v_proj.weight_scale"].repeat(2)), None,
     ["v_proj.weight_scale has shape [2]", "per-tensor weight scale is [] or [1]"]),
    ("fbgemm", None, lambda hf: hf["quantization_config"].__setitem__(
        "modules_to_not_convert", ["model.layers.0", "lm_head"]),
     ["model.layers.0.mlp.gate_proj.weight is F8_E4M3", "keeps model.layers.0.mlp.gate_proj "
      "in floats (modules_to_not_convert)"]),
    ("ct-channel-dynamic", None, lambda hf: hf["quantization_config"].__setitem__(
        "ignore", ["lm_head", "re:.*o_proj"]),
     ["o_proj.weight is F8_E4M3", "config.json this checkpoint's"]),
    ("ct-tensor-static", None, lambda hf: hf["quantization_config"]["config_groups"]
     ["group_0"]["weights"].__setitem__("strategy", "group"),
     ["group-wise weight scales", "--quantize fp8 instead"]),
])
def test_bad_checkpoints(ckpts, tmp_path, name, edit, config_edit, needles):
    d = _copy(ckpts[name][0], tmp_path / "ckpt", edit, config_edit)
    before = sorted(os.listdir(d))
    proc = halo("import-params", "--safetensors", d, "-o", d / "w.irpa", check=False)
    assert_one_line_error(proc, *needles)
    assert sorted(os.listdir(d)) == before


def test_truncated_file(ckpts, tmp_path):
    c = ckpts["fbgemm"][0]
    d = tmp_path / "ckpt"
    shutil.copytree(c.path, d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    proc = halo("import-params", "--safetensors", d, "--tp", 2, "-o", d / "w.irpa", check=False)
    assert_one_line_error(proc, "truncated", "download it again")
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]


def test_nan_weight_names_the_tensor(ckpts, tmp_path):
    """Found while streaming: the progress lines so far, then one error line, no file."""
    d = _copy(ckpts["fbgemm"][0], tmp_path / "ckpt", _nan)
    proc = halo("import-params", "--safetensors", d, "-o", d / "w.irpa", check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == [lines[-1]], proc.stderr
    assert "model.layers.1.mlp.gate_proj.weight holds NaN" in errors[0]
    assert "first in row 7" in errors[0] and "download it again" in errors[0]
    assert all(line.startswith(("importing:", "FP8 checkpoint")) for line in lines[:-1])
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]


def test_bad_flags_with_an_fp8_checkpoint(ckpts, tmp_path):
    c = ckpts["fbgemm"][0]
    proc = halo("import-params", "--safetensors", c.path, "--quantize", "fp8",
                "-o", tmp_path / "w.irpa", check=False)
    assert_one_line_error(proc, "already an FP8 checkpoint (fbgemm_fp8)", "drop --quantize fp8")
    # layer 0's attention is bf16, the other layers' fp8: no stacked entry holds both
    proc = halo("import-params", "--safetensors", c.path, "--layout", "stacked",
                "-o", tmp_path / "w.irpa", check=False)
    assert_one_line_error(proc, "blk.*.attn_q.weight is fp8 in layers 1 and float in layers 0",
                          "--layout per-layer")
    proc = halo("import-params", "--safetensors", c.path, "--tp", 4,
                "-o", tmp_path / "w.irpa", check=False)
    assert_one_line_error(proc, "--tp 4 does not divide")
    assert os.listdir(tmp_path) == []


def test_sharded_checkpoint(ckpts, tmp_path):
    """An index over two files, each linear's scale in the other file than its weight: the
    same parameters; a scale the index does not list is one line."""
    from safetensors.torch import save_file

    c, _, whole = ckpts["fbgemm"]
    d = tmp_path / "ckpt"
    d.mkdir()
    names = sorted(c.tensors)
    part = {n: "a.safetensors" if (i % 2 == 0) != n.endswith("_scale") else "b.safetensors"
            for i, n in enumerate(names)}
    for file in ("a.safetensors", "b.safetensors"):
        save_file({n: c.tensors[n] for n in names if part[n] == file}, str(d / file),
                  metadata={"format": "pt"})
    shutil.copy(c.path / "config.json", d / "config.json")
    index = {"metadata": {}, "weight_map": part}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    halo("import-params", "--safetensors", d, "-o", tmp_path / "w.irpa")
    assert entries(tmp_path / "w.irpa") == whole
    del index["weight_map"]["model.layers.1.mlp.down_proj.weight_scale"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    proc = halo("import-params", "--safetensors", d, "-o", tmp_path / "x.irpa", check=False)
    assert_one_line_error(proc, "index: checkpoint lacks model.layers.1.mlp.down_proj.weight_scale")
    assert not (tmp_path / "x.irpa").exists()


def test_calibrating_sources_refuse_an_fp8_checkpoint(ckpts):
    """`import_fp8`'s row sources read floats: an FP8 checkpoint is one line naming the fix."""
    from halo_mlir.params.sources import open_source

    with pytest.raises(HaloError, match=r"already an FP8 checkpoint \(compressed-tensors\); "
                                        r"import it as it is"):
        open_source(safetensors=ckpts["ct-channel-dynamic"][0].path)
