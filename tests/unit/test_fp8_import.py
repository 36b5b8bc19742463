"""`import-params --quantize fp8`: the entries of `params.names.fp8_param_entries`, weight scales and fp8
values, and activation scales checked against HF transformers run on the same tokens
(hooks on the linears' inputs, a capturing attention function for Q/K/V after RoPE)."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import halo
from test_cli_errors import assert_one_line_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from hf_reference import make_model  # noqa: E402

from halo_mlir.params.names import fp8_param_entries  # noqa: E402
from halo_mlir.quantization import fp8  # noqa: E402

DTYPE_BYTES = {"float": 2, "f32": 4, fp8.FP8: 1}  # the import's --dtype is f16 (default)
LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
           "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
           "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def entries(path) -> dict[str, bytes]:
    """Every entry of an IRPA, in file order."""
    import iree.runtime as rt

    index = rt.ParameterIndex()
    index.load(str(path))
    return {key: bytes(memoryview(e.file_view)) for key, e in index.items()}


def scalar(data: bytes) -> np.float32:
    assert len(data) == 4
    return np.frombuffer(data, np.float32)[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(dir, HF model, cfg, per-layer FP8 entries) for the awkward tiny model (GQA,
    llama3 rope scaling), imported without a tokenizer: pseudo-random calibration ids."""
    from halo_mlir import config

    d = tmp_path_factory.mktemp("fp8")
    model = make_model(d)
    proc = halo("import-params", "--safetensors", d, "--quantize", "fp8", "-o", d / "w.irpa")
    assert "pseudo-random token ids (seed 0)" in proc.stderr and "--tokenizer" in proc.stderr
    return d, model, config.from_hf_config(d / "config.json"), entries(d / "w.irpa")


def weight(model, key) -> np.ndarray:
    """The HF model's f32 tensor for ABI key `key`."""
    from halo_mlir.params.names import hf_name

    return model.state_dict()[hf_name(key)].float().numpy()


def hf_scales(model, ids) -> dict[str, np.float32]:
    """The activation rscales from transformers' own forward (f32) over `ids`."""
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward

    amax: dict[str, float] = {}

    def record(key, t):
        amax[key] = max(amax.get(key, 0.0), float(t.detach().abs().max()))

    def capture(module, query, key, value, attention_mask, **kwargs):  # post-RoPE q, k
        record(fp8.q_scale_key(module.layer_idx), query)
        record(fp8.kv_scale_key(module.layer_idx), key)
        record(fp8.kv_scale_key(module.layer_idx), value)
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("halo_capture", capture)
    AttentionMaskInterface.register("halo_capture", eager_mask)
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            module = layer.get_submodule(LINEARS[name])
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, key=fp8.input_scale_key(i, name): record(key, args[0])))
    tokens = torch.tensor([list(ids)], dtype=torch.long)
    try:
        with torch.no_grad():
            eager = model(tokens).logits
            model.set_attn_implementation("halo_capture")
            amax.clear()
            captured = model(tokens).logits
    finally:
        model.set_attn_implementation("eager")
        for h in hooks:
            h.remove()
    assert torch.allclose(captured, eager, atol=1e-5)  # the capture changes nothing
    return {k: fp8.scale_of(v) for k, v in amax.items()}


def test_entries_follow_the_contract(ckpt):
    _, _, cfg, got = ckpt
    want = fp8_param_entries(cfg)
    assert list(got) == list(want)  # same keys, same order
    for key, (shape, kind) in want.items():
        assert len(got[key]) == int(np.prod(shape, dtype=np.int64)) * DTYPE_BYTES[kind], key


def test_weights_are_quantized_with_amax_scales(ckpt):
    _, model, cfg, got = ckpt
    for key, (shape, kind) in fp8_param_entries(cfg).items():
        if kind == "float":
            want = weight(model, key).astype(np.float16)
            assert np.array_equal(np.frombuffer(got[key], np.float16).reshape(shape), want), key
        if kind != fp8.FP8:
            continue
        w = weight(model, key[:-len(":qs")])
        qs_key, d_key = fp8.weight_keys(key[:-len(":qs")])
        d = scalar(got[d_key])
        assert d == np.float32(float(np.abs(w).max()) / 240), d_key
        qs = np.frombuffer(got[qs_key], fp8.numpy_fp8()).reshape(shape)
        assert np.abs(qs.astype(np.float32)).max() == 240  # amax lands on fp8's largest
        deq = fp8.dequantize(qs, d)
        assert np.all(np.abs(deq - w) <= 2.0 ** -4 * np.abs(w) + 2.0 ** -10 * d), key


def test_activation_scales_match_transformers(ckpt):
    from halo_mlir.params.calibrate import calibration_ids

    _, model, cfg, got = ckpt
    ids = calibration_ids(cfg.vocab_size)  # what the import used: no tokenizer
    assert len(ids) == 256 and np.array_equal(ids, calibration_ids(cfg.vocab_size))
    ref = hf_scales(model, ids)
    scales = {k for k, (_, kind) in fp8_param_entries(cfg).items()
              if kind == "f32" and not k.endswith(":d")}
    assert scales == set(ref)
    for key in sorted(scales):
        assert scalar(got[key]) == pytest.approx(ref[key], rel=1e-4), key


def byte_tokenizer(path):
    """A tokenizer.json whose ids are the UTF-8 bytes (256 < the model's 300 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from halo_mlir.params.tokenizer import _byte_alphabet

    vocab = {char: byte for byte, char in _byte_alphabet().items()}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.save(str(path))


def test_calibration_text_through_a_tokenizer(ckpt, tmp_path):
    from halo_mlir.params.calibrate import calibration_ids
    from halo_mlir.params.tokenizer import JsonTokenizer

    d, model, cfg, _ = ckpt
    byte_tokenizer(tmp_path / "tokenizer.json")
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    proc = halo("import-params", "--safetensors", d, "--quantize", "fp8", "--tokenizer",
                tmp_path / "tokenizer.json", "--calibration-text", text,
                "--calibration-tokens", 40, "-o", tmp_path / "t.irpa")
    assert "calibration: 40 tokens of" in proc.stderr
    got = entries(tmp_path / "t.irpa")
    ids = calibration_ids(cfg.vocab_size, 40, JsonTokenizer(tmp_path / "tokenizer.json"),
                          text.read_text())
    assert list(ids[:4]) == list(b"The ")
    ref = hf_scales(model, ids)
    for key in sorted(ref):
        assert scalar(got[key]) == pytest.approx(ref[key], rel=1e-4), key


def test_tp2_rank_files(ckpt, tmp_path):
    d, _, cfg, whole = ckpt
    halo("import-params", "--safetensors", d, "--quantize", "fp8", "--tp", 2,
         "-o", tmp_path / "w.irpa")
    ranks = [entries(tmp_path / f"w.rank{i}.irpa") for i in range(2)]
    for key, (shape, kind) in fp8_param_entries(cfg).items():
        if kind == fp8.FP8:
            dim = 1 if key.split(".")[2] in ("attn_output", "ffn_down") else 0
            full = np.frombuffer(whole[key], np.uint8).reshape(shape)
            for i in range(2):
                piece = np.frombuffer(ranks[i][f"{key}.shard.{i}"], np.uint8)
                assert np.array_equal(piece, np.split(full, 2, axis=dim)[i].reshape(-1)), key
            assert key not in ranks[0] and key not in ranks[1]
        elif kind == "f32":  # scalar scales: once, in rank 0
            assert ranks[0][key] == whole[key] and key not in ranks[1], key
            assert not any(k.startswith(key + ".shard") for r in ranks for k in r)
    assert "blk.0.attn_norm.weight" in ranks[0] and "output.weight.shard.1" in ranks[1]


def test_stacked_layout(ckpt, tmp_path):
    from halo_mlir.params.names import layer_of, stacked_key

    d, _, cfg, whole = ckpt
    halo("import-params", "--safetensors", d, "--quantize", "fp8", "--layout", "stacked",
         "-o", tmp_path / "s.irpa")
    got = entries(tmp_path / "s.irpa")
    want: dict[str, list[bytes]] = {}
    for key in fp8_param_entries(cfg):
        want.setdefault(stacked_key(key) or key, []).append(whole[key])
        assert stacked_key(key) is None or len(want[stacked_key(key)]) == layer_of(key) + 1
    assert sorted(got) == sorted(want)
    for key, parts in want.items():
        assert got[key] == b"".join(parts), key
    L = cfg.n_layers
    assert len(got["blk.attn_q.weight.stacked:qs"]) == L * cfg.n_heads * cfg.head_dim * cfg.hidden_size
    for key in ("blk.attn_q.weight.stacked:d", "blk.attn_q.q_input.stacked:rscale",
                "blk.attn_q.q_output.stacked:rscale", "blk.kv_cache.quantizer.stacked:rscale"):
        assert len(got[key]) == 4 * L, key
    # --tp 2 as well: split fields per rank, stacked scalars [L] in rank 0 only.
    halo("import-params", "--safetensors", d, "--quantize", "fp8", "--layout", "stacked",
         "--tp", 2, "-o", tmp_path / "st.irpa")
    ranks = [entries(tmp_path / f"st.rank{i}.irpa") for i in range(2)]
    assert len(ranks[1]["blk.ffn_down.weight.stacked:qs.shard.1"]) == \
        L * cfg.hidden_size * cfg.ffn_dim // 2
    assert ranks[0]["blk.ffn_down.weight.stacked:d"] == got["blk.ffn_down.weight.stacked:d"]
    assert "blk.ffn_down.weight.stacked:d" not in ranks[1]


def test_streaming_in_small_blocks_gives_the_same_file(ckpt, tmp_path, monkeypatch):
    from halo_mlir.params import sources
    from halo_mlir.params.calibrate import calibration_ids
    from halo_mlir.params.fp8_import import import_fp8

    d, _, cfg, whole = ckpt
    monkeypatch.setattr(sources, "BLOCK_BYTES", 1000)  # a few rows per block
    with sources.open_source(safetensors=d) as src:
        assert len(list(src.row_blocks("blk.0.ffn_gate.weight"))) > 10
        import_fp8(src, tmp_path / "b.irpa", calibration_ids(cfg.vocab_size))
    got = entries(tmp_path / "b.irpa")
    assert list(got) == list(whole)
    for key in whole:
        if key.endswith(":rscale"):  # matmuls by blocks may round differently
            assert scalar(got[key]) == pytest.approx(scalar(whole[key]), rel=1e-5), key
        else:
            assert got[key] == whole[key], key


def test_gguf_source_matches_the_hf_weights(tmp_path, monkeypatch):
    """GGUF (Q/K permuted by llama.cpp, one Q8_0 weight) and the same weights as
    safetensors: the same f32 rows, in any row range, and the same scales."""
    import gguf
    from safetensors.numpy import save_file

    from halo_mlir.params import sources
    from halo_mlir.params.calibrate import calibrate, calibration_ids
    from halo_mlir.params.names import hf_name
    from test_gguf import CFG, write_gguf

    hf = write_gguf(tmp_path / "m.gguf", qtypes={"blk.0.ffn_up.weight": "Q8_0"})
    q8 = gguf.GGMLQuantizationType.Q8_0
    hf["blk.0.ffn_up.weight"] = gguf.quants.dequantize(
        gguf.quants.quantize(hf["blk.0.ffn_up.weight"], q8), q8)
    (tmp_path / "st").mkdir()
    save_file({hf_name(k): v for k, v in hf.items()}, str(tmp_path / "st/model.safetensors"))
    (tmp_path / "st/config.json").write_text(json.dumps({
        "hidden_size": CFG["hidden"], "intermediate_size": CFG["ffn"], "num_hidden_layers": 1,
        "num_attention_heads": CFG["heads"], "num_key_value_heads": CFG["kv_heads"],
        "vocab_size": CFG["vocab"], "rope_theta": 10000.0, "rms_norm_eps": 1e-5}))
    monkeypatch.setattr(sources, "BLOCK_BYTES", 700)  # blocks that cut through heads
    with sources.open_source(gguf=tmp_path / "m.gguf") as g, \
            sources.open_source(safetensors=tmp_path / "st") as st:
        assert g.cfg.n_kv_heads == st.cfg.n_kv_heads == 2 and g.cfg.rope_scaling is None
        np.testing.assert_array_equal(g.rows("blk.0.attn_q.weight", 5, 27),
                                      hf["blk.0.attn_q.weight"][5:27])
        for key in hf:
            for (_, _, a), (_, _, b) in zip(g.row_blocks(key), st.row_blocks(key)):
                np.testing.assert_array_equal(a, b)
        ids = calibration_ids(g.cfg.vocab_size, 50)
        assert calibrate(g, ids) == calibrate(st, ids)
    out = tmp_path / "g.irpa"
    proc = halo("import-params", "--gguf", tmp_path / "m.gguf", "--quantize", "fp8", "-o", out)
    assert "pseudo-random" in proc.stderr  # this GGUF's toy vocabulary makes no tokenizer
    assert list(entries(out)) == list(fp8_param_entries(g.cfg))


@pytest.mark.parametrize("args,needle", [
    (["--quantize", "fp8", "--keep-quantized"], "drop --keep-quantized"),
    (["--gguf", "m.gguf", "--quantize", "fp8", "--keep-quantized"], "drop --keep-quantized"),
    (["--quantize", "int3"], "unknown --quantize 'int3': choose one of fp8"),
    (["--tokenizer", "tokenizer.json"], "--tokenizer applies to --quantize fp8"),
    (["--quantize", "fp8", "--calibration-text", "nope.txt"], "nope.txt: no such file"),
    (["--quantize", "fp8", "--calibration-tokens", "0"], "at least 1"),
    (["--quantize", "fp8", "--tp", "4"], "--tp 4 does not divide"),
])
def test_bad_flags(ckpt, tmp_path, args, needle):
    """One line, non-zero exit, nothing written."""
    source = [] if "--gguf" in args else ["--safetensors", ckpt[0]]
    proc = halo("import-params", *source, *args, "-o", tmp_path / "w.irpa", check=False)
    assert_one_line_error(proc, needle)
    assert os.listdir(tmp_path) == []


def test_missing_tensor_writes_nothing(tmp_path):
    from test_cli_errors import tiny_checkpoint

    tiny_checkpoint(tmp_path, drop="model.layers.1.mlp.up_proj.weight")
    proc = halo("import-params", "--safetensors", tmp_path, "--quantize", "fp8", "--tp", 2,
                "-o", tmp_path / "w.irpa", check=False)
    assert_one_line_error(proc, "lacks tensor model.layers.1.mlp.up_proj.weight")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


# ---- --fp8-scales per-channel: one weight scale per output row ------------------------------
@pytest.fixture(scope="module")
def per_channel(ckpt, tmp_path_factory):
    """(dir, model, cfg, entries) of the same checkpoint imported with per-channel scales."""
    d, model, cfg, _ = ckpt
    out = tmp_path_factory.mktemp("fp8pc") / "pc.irpa"
    halo("import-params", "--safetensors", d, "--quantize", "fp8", "--fp8-scales",
         "per-channel", "-o", out)
    return d, model, cfg, entries(out)


def test_per_channel_entries_follow_the_contract(ckpt, per_channel):
    _, _, cfg, got = per_channel
    want = fp8_param_entries(cfg, "per-channel")
    assert list(got) == list(want)  # same keys, same order
    for key, (shape, kind) in want.items():
        assert len(got[key]) == int(np.prod(shape, dtype=np.int64)) * DTYPE_BYTES[kind], key
    d_rows = [k for k in want if k.endswith(":d_rows")]
    assert len(d_rows) == 7 * cfg.n_layers and not any(k.endswith(":d") for k in want)
    assert want["blk.0.ffn_down.weight:d_rows"] == ((cfg.hidden_size,), "f32")
    assert want["blk.0.attn_k.weight:d_rows"] == ((cfg.n_kv_heads * cfg.head_dim,), "f32")
    # Everything else (activation scales, float tensors, key order) as per-tensor.
    whole = ckpt[3]
    for key in whole:
        if not key.endswith((":d", ":qs")):
            assert got[key] == whole[key], key


def test_per_channel_weights_are_quantized_with_row_scales(per_channel):
    _, model, cfg, got = per_channel
    for key, (shape, kind) in fp8_param_entries(cfg, "per-channel").items():
        if kind != fp8.FP8:
            continue
        w = weight(model, key[:-len(":qs")])
        qs_key, d_key = fp8.weight_keys(key[:-len(":qs")], "per-channel")
        d = np.frombuffer(got[d_key], np.float32)
        assert d.shape == (shape[0],)
        np.testing.assert_array_equal(d, (np.abs(w).max(axis=1) / 240).astype(np.float32))
        qs = np.frombuffer(got[qs_key], fp8.numpy_fp8()).reshape(shape).astype(np.float32)
        assert np.all(np.abs(qs).max(axis=1) == 240)  # every row's amax lands on 240
        deq = qs * d[:, None]
        # Within fp8 rounding of each row: half an ulp (3-bit mantissa) of the value, or of
        # the row's smallest normal step.
        assert np.all(np.abs(deq - w) <= 2.0 ** -4 * np.abs(w) + 2.0 ** -10 * d[:, None]), key
    # The per-row scales differ (else per-channel would gain nothing on this model).
    d = np.frombuffer(got["blk.0.ffn_gate.weight:d_rows"], np.float32)
    assert d.max() > 1.2 * d.min()


def test_per_channel_tp2_and_stacked(per_channel, tmp_path):
    """--tp 2: a row-split weight's (q/k/v/gate/up) row scales split with its rows; a
    column-split weight (attn_output/down) keeps all its row scales, once, in rank 0.
    --layout stacked: `blk.NAME.weight.stacked:d_rows` [layers, out]; both together."""
    from halo_mlir.params.names import stacked_key

    d, _, cfg, whole = per_channel
    halo("import-params", "--safetensors", d, "--quantize", "fp8", "--fp8-scales",
         "per-channel", "--tp", 2, "-o", tmp_path / "w.irpa")
    ranks = [entries(tmp_path / f"w.rank{i}.irpa") for i in range(2)]
    for key in fp8_param_entries(cfg, "per-channel"):
        if not key.endswith((":d_rows", ":qs")):
            continue
        by_rows = key.split(".")[2] not in ("attn_output", "ffn_down")
        if key.endswith(":d_rows") and not by_rows:
            assert ranks[0][key] == whole[key] and key not in ranks[1], key
            continue
        elem = 4 if key.endswith(":d_rows") else 1
        full = np.frombuffer(whole[key], np.uint8)
        rows = fp8_param_entries(cfg, "per-channel")[key][0][0]
        full = full.reshape(rows, -1)
        dim = 0 if by_rows or key.endswith(":d_rows") else 1
        for i in range(2):
            piece = np.frombuffer(ranks[i][f"{key}.shard.{i}"], np.uint8)
            assert np.array_equal(piece, np.split(full, 2, axis=dim)[i].reshape(-1)), key
        assert elem == 1 or len(ranks[0][f"{key}.shard.0"]) == 4 * rows // 2
    halo("import-params", "--safetensors", d, "--quantize", "fp8", "--fp8-scales",
         "per-channel", "--layout", "stacked", "-o", tmp_path / "s.irpa")
    got = entries(tmp_path / "s.irpa")
    want: dict[str, list[bytes]] = {}
    for key in fp8_param_entries(cfg, "per-channel"):
        want.setdefault(stacked_key(key) or key, []).append(whole[key])
    assert sorted(got) == sorted(want)
    for key, parts in want.items():
        assert got[key] == b"".join(parts), key
    L = cfg.n_layers
    assert len(got["blk.ffn_up.weight.stacked:d_rows"]) == 4 * L * cfg.ffn_dim
    halo("import-params", "--safetensors", d, "--quantize", "fp8", "--fp8-scales",
         "per-channel", "--layout", "stacked", "--tp", 2, "-o", tmp_path / "st.irpa")
    st = [entries(tmp_path / f"st.rank{i}.irpa") for i in range(2)]
    up = np.frombuffer(got["blk.ffn_up.weight.stacked:d_rows"], np.float32).reshape(L, -1)
    for i in range(2):
        np.testing.assert_array_equal(
            np.frombuffer(st[i][f"blk.ffn_up.weight.stacked:d_rows.shard.{i}"], np.float32),
            np.split(up, 2, axis=1)[i].reshape(-1))
    assert st[0]["blk.ffn_down.weight.stacked:d_rows"] == got["blk.ffn_down.weight.stacked:d_rows"]
    assert not any(k.startswith("blk.ffn_down.weight.stacked:d_rows") for k in st[1])


def test_per_channel_streaming_in_small_blocks(per_channel, tmp_path, monkeypatch):
    """Row blocks that cut a weight anywhere give the same row scales and fp8 values."""
    from halo_mlir.params import sources
    from halo_mlir.params.calibrate import calibration_ids
    from halo_mlir.params.fp8_import import import_fp8

    d, _, cfg, whole = per_channel
    monkeypatch.setattr(sources, "BLOCK_BYTES", 1000)
    with sources.open_source(safetensors=d) as src:
        import_fp8(src, tmp_path / "b.irpa", calibration_ids(cfg.vocab_size),
                   scales="per-channel")
    got = entries(tmp_path / "b.irpa")
    assert list(got) == list(whole)
    for key in whole:
        if not key.endswith(":rscale"):
            assert got[key] == whole[key], key


@pytest.mark.parametrize("args,needle", [
    (["--fp8-scales", "per-channel"], "--fp8-scales applies to --quantize fp8 only"),
    (["--quantize", "fp8", "--fp8-scales", "per-row"], "per-row"),
])
def test_per_channel_bad_flags(ckpt, tmp_path, args, needle):
    proc = halo("import-params", "--safetensors", ckpt[0], *args, "-o", tmp_path / "w.irpa",
                check=False)
    assert_one_line_error(proc, needle)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("wanted,files,needle", [
    ("blk.0.attn_q.weight:d", ["blk.0.attn_q.weight:d_rows"], "emit with --fp8-scales per-channel"),
    ("blk.0.attn_q.weight:d_rows", ["blk.0.attn_q.weight:d"], "emit with --fp8-scales per-tensor"),
    ("blk.0.attn_q.weight:d.shard.1", ["blk.0.attn_q.weight:d_rows.shard.1"],
     "files hold per-channel ones (blk.0.attn_q.weight:d_rows)"),
    ("blk.ffn_down.weight.stacked:d_rows", ["blk.ffn_down.weight.stacked:d"],
     "import with --fp8-scales per-channel"),
    ("blk.0.attn_q.weight:d", ["blk.0.attn_q.weight:d"], None),
])
def test_scales_scheme_mismatch_message(wanted, files, needle):
    """What `runtime.Program` says when the module's weight-scale key is missing and the
    other scheme's is there (per-layer, sharded, stacked); nothing for other misses."""
    from halo_mlir.inference.runtime import _fp8_scales_mismatch

    msg = _fp8_scales_mismatch(wanted, files + ["blk.0.attn_q.weight:qs"])
    if needle is None:
        assert msg is None
    else:
        assert needle in msg and "\n" not in msg, msg
