"""Mixtral through the user-facing commands: a random-weight transformers MixtralForCausalLM
(the awkward sizes of test_mixtral_vs_hf.py) written as llama.cpp's GGUF (f32 and Q8_0, with
a byte-level BPE tokenizer in its metadata) and as safetensors, then `halo-mlir generate`,
the Python API and `halo-mlir perplexity`, each compared with transformers.

One CPU compile in all: the f32 and Q8_0 GGUFs dequantize to the same program (bs 1), which
`generate` caches, and the safetensors checkpoint's `emit --hf-config` program is checked to
be that same text before its cached vmfb is run with the checkpoint's own parameters."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
import torch

from conftest import halo
from hf_reference import MIXTRAL_AWKWARD, logits, make_mixtral
from moe_gguf import byte_level_bpe, write_mixtral_gguf

PROMPT = "In the beginning"  # transformers' greedy top-2 margins here are >= 0.13 (checked)
NEW_TOKENS = 8
TOL = 1e-3  # max |logit error| in f32
EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """(dir, transformers model, its Q8_0-dequantized twin, tokenizer) with m.gguf (f32),
    q8.gguf (Q8_0 matrices), the safetensors checkpoint, tokenizer.json and a cache dir for
    `generate`'s builds (HALO_CACHE_DIR while the module runs)."""
    from safetensors.numpy import load_file, save_file
    from transformers import MixtralForCausalLM

    d = tmp_path_factory.mktemp("moe_generate")
    model = make_mixtral(d)
    tk = byte_level_bpe(MIXTRAL_AWKWARD["vocab_size"], EOS)
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    hf = json.loads((d / "config.json").read_text())
    tensors = load_file(str(d / "model.safetensors"))
    write_mixtral_gguf(d / "m.gguf", tensors, hf, tokenizer=tk)
    dequantized = write_mixtral_gguf(d / "q8.gguf", tensors, hf, tokenizer=tk, qtype="Q8_0")
    q8_dir = d / "q8_reference"  # transformers with the values gguf dequantizes Q8_0 to
    q8_dir.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in dequantized.items()},
              str(q8_dir / "model.safetensors"))
    (q8_dir / "config.json").write_text(json.dumps(hf))
    q8_model = MixtralForCausalLM.from_pretrained(q8_dir, attn_implementation="eager").eval()
    old = os.environ.get("HALO_CACHE_DIR")
    os.environ["HALO_CACHE_DIR"] = str(d / "cache")
    yield d, model, q8_model, tk
    if old is None:
        del os.environ["HALO_CACHE_DIR"]
    else:
        os.environ["HALO_CACHE_DIR"] = old


def _build(path):
    from halo_mlir.inference.generate import Generator, build_from_gguf
    from halo_mlir.params.gguf_file import GgufFile

    with GgufFile(path) as g:
        files = build_from_gguf(g, dtype="f32", keep_quantized=False, device="cpu",
                                echo=lambda _: None)
    return files, Generator(files, pages=16)


def _reference_greedy(model, ids, n):
    """transformers' generate(do_sample=False): the tokens and each step's logits."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             output_logits=True, return_dict_in_generate=True,
                             eos_token_id=None, pad_token_id=0)
    return out.sequences[0, len(ids):].tolist(), [s[0].float().numpy() for s in out.logits]


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_logits_match_transformers(mixtral, qtype):
    """The Python API on the GGUF-built module: prefill logits of every prompt position,
    then each greedy decode step's logits, against transformers with the GGUF's values
    (for Q8_0, as the gguf package dequantizes them, which moves the logits far more
    than the bound: the test tells the quantized values from the f32 ones)."""
    d, model, q8_model, tk = mixtral
    ref = q8_model if qtype == "Q8_0" else model
    files, gen = _build(d / ("q8.gguf" if qtype == "Q8_0" else "m.gguf"))
    ids = tk.encode(PROMPT).ids
    try:
        owned = gen.pages.alloc(1)
        prefill = gen.prefill_logits(ids, owned)
        gen.pages.free(owned)
        record = []
        tokens = list(gen.generate(ids, NEW_TOKENS, record=record))
    finally:
        gen.close()
    worst = np.abs(prefill - logits(ref, ids)).max()
    for step, got in enumerate(record):
        worst = max(worst, np.abs(got - logits(ref, ids + tokens[:step])[-1]).max())
    print(f"mixtral GGUF {qtype}: max |logit error| = {worst:.3g} over {len(ids)} prefill "
          f"positions and {len(record)} decode steps")
    assert worst <= TOL
    if qtype == "Q8_0":
        assert np.abs(logits(q8_model, ids) - logits(model, ids)).max() > 10 * TOL
        f32_files, f32_gen = _build(d / "m.gguf")  # built (cached) by the F32 case
        f32_gen.close()
        assert files.vmfb == f32_files.vmfb and files.params != f32_files.params


def _generated(stdout: str) -> str:
    assert stdout.startswith(PROMPT), stdout
    return stdout[len(PROMPT):].removesuffix("\n")


def test_generate_greedy_equals_transformers(mixtral):
    """`halo-mlir generate --gguf` and the Python API (`complete`) continue the prompt with
    transformers' greedy tokens. Every step's top-2 margin in transformers is above 10x
    the logit bound, so the equality is not luck."""
    from halo_mlir.inference.generate import complete
    from halo_mlir.params.gguf_file import GgufFile
    from halo_mlir.params.tokenizer import GgufTokenizer

    d, model, _, tk = mixtral
    ids = tk.encode(PROMPT).ids
    want, steps = _reference_greedy(model, ids, NEW_TOKENS)
    margins = [float(np.diff(np.sort(s)[-2:])[0]) for s in steps]
    assert min(margins) > 10 * TOL, margins
    proc = halo("generate", "--gguf", d / "m.gguf", "--raw", "--prompt", PROMPT,
                "--max-tokens", NEW_TOKENS)
    assert _generated(proc.stdout) == tk.decode(want, skip_special_tokens=True)
    assert f"{len(ids)} prompt tokens, {NEW_TOKENS} generated" in proc.stderr
    with GgufFile(d / "m.gguf") as g:
        gguf_tok = GgufTokenizer(g)
    _, gen = _build(d / "m.gguf")
    try:
        out = complete(gen, gguf_tok, PROMPT, NEW_TOKENS)
    finally:
        gen.close()
    assert out.prompt_ids == ids and out.tokens == want


def _reference_perplexity(model, ids, window, stride):
    """exp(mean NLL) of ids[1:], each token scored once with up to `window` tokens of
    context (HF's sliding-window recipe), from transformers' logits."""
    nll, count, scored_to = 0.0, 0, 1
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        logp = torch.log_softmax(torch.from_numpy(logits(model, ids[begin:end])).double(), -1)
        for t in range(max(scored_to, begin + 1), end):
            nll -= float(logp[t - begin - 1, ids[t]])
            count += 1
        scored_to = end
        if end == len(ids):
            break
    return math.exp(nll / count), count


def _perplexity(proc):
    m = re.fullmatch(r"perplexity (\S+) over (\d+) tokens \(window \d+, stride \d+\)\n",
                     proc.stdout)
    assert m, proc.stdout
    return float(m.group(1)), int(m.group(2))


TEXT = ("The first program emitted here was a decoder. It read its weights from a file, "
        "ran a prefill over the prompt and then one token at a time, and its answers were "
        "checked against another implementation of the same model.")


def test_perplexity_equals_transformers(mixtral):
    """`halo-mlir perplexity --gguf` over several windows equals the perplexity computed
    from transformers' logits, within 1e-3 relative."""
    d, model, _, tk = mixtral
    (d / "text.txt").write_text(TEXT)
    ids = tk.encode(TEXT).ids
    want, n = _reference_perplexity(model, ids, 24, 16)
    got, count = _perplexity(halo("perplexity", "--gguf", d / "m.gguf", "--text",
                                  d / "text.txt", "--window", 24, "--stride", 16))
    print(f"mixtral perplexity: halo {got:.4f}, transformers {want:.4f} over {n} tokens")
    assert count == n == len(ids) - 1 and len(ids) > 24
    assert got == pytest.approx(want, rel=1e-3)


def test_safetensors_generate_and_perplexity(mixtral, tmp_path):
    """From the safetensors checkpoint: `import-params`, `emit --hf-config` (bs 1, f32) and
    `generate` / `perplexity --vmfb --params --config --tokenizer`. The emitted program is
    the GGUF's (the same text as `generate --gguf` compiled), so its cached vmfb runs the
    checkpoint's own parameters; the answers equal transformers'."""
    d, model, _, tk = mixtral
    irpa, mlir, conf = tmp_path / "s.irpa", tmp_path / "m.mlir", tmp_path / "config.json"
    halo("import-params", "--safetensors", d, "--dtype", "f32", "-o", irpa)
    halo("emit", "--hf-config", d / "config.json", "--dtype", "f32", "--bs-prefill", 1,
         "--bs-decode", 1, "-o", mlir, "--output-config", conf)
    files, gen = _build(d / "m.gguf")
    gen.close()
    assert mlir.read_text() == (files.vmfb.parent / "model.mlir").read_text()
    assert json.loads(conf.read_text()) == files.config
    given = ["--vmfb", files.vmfb, "--params", irpa, "--config", conf,
             "--tokenizer", d / "tokenizer.json"]
    ids = tk.encode(PROMPT).ids
    want, _ = _reference_greedy(model, ids, NEW_TOKENS)
    proc = halo("generate", *given, "--raw", "--prompt", PROMPT, "--max-tokens", NEW_TOKENS)
    assert _generated(proc.stdout) == tk.decode(want, skip_special_tokens=True)
    (tmp_path / "text.txt").write_text(TEXT)
    got, _ = _perplexity(halo("perplexity", *given, "--text", tmp_path / "text.txt",
                              "--window", 24, "--stride", 16))
    assert got == pytest.approx(_reference_perplexity(model, tk.encode(TEXT).ids, 24, 16)[0],
                                rel=1e-3)


# ---- Grok-1 (a `grok` GGUF) -----------------------------------------------------------
@pytest.fixture(scope="module")
def grok(tmp_path_factory, mixtral):
    """(dir, weights, tokenizer): test_grok_vs_reference's random Grok written as a `grok`
    GGUF with a byte-level BPE tokenizer; builds go to the module's cache (HALO_CACHE_DIR)."""
    from test_grok_vs_reference import V, make_weights, write_gguf

    d = tmp_path_factory.mktemp("grok_generate")
    w = make_weights()
    tk = byte_level_bpe(V, EOS)
    write_gguf(d / "grok.gguf", w, tokenizer=tk)
    return d, w, tk


def test_grok_generate_and_perplexity_equal_the_reference(grok):
    """`halo-mlir generate --gguf` and `perplexity --gguf` on the Grok GGUF, and each
    greedy step's logits through the Python API, against test_grok_vs_reference's torch
    implementation of Grok-1's forward (the random model repeats a token, by margins of ~7)."""
    from test_grok_vs_reference import reference

    d, w, tk = grok
    ids = tk.encode(PROMPT).ids
    want, worst = [], 0.0
    files, gen = _build(d / "grok.gguf")
    record = []
    try:
        got = list(gen.generate(ids, NEW_TOKENS, record=record))
    finally:
        gen.close()
    for step in range(NEW_TOKENS):
        ref = reference(w, ids + want)[-1]
        assert np.diff(np.sort(ref)[-2:])[0] > 10 * TOL
        worst = max(worst, np.abs(record[step] - ref).max())
        want.append(int(ref.argmax()))
    print(f"grok GGUF generate: max |logit error| = {worst:.3g} over {NEW_TOKENS} steps")
    assert worst <= TOL and got == want
    proc = halo("generate", "--gguf", d / "grok.gguf", "--raw", "--prompt", PROMPT,
                "--max-tokens", NEW_TOKENS)
    assert _generated(proc.stdout) == tk.decode(want, skip_special_tokens=True)
    (d / "text.txt").write_text(TEXT)
    text_ids = tk.encode(TEXT).ids
    logp = torch.log_softmax(torch.from_numpy(reference(w, text_ids)).double(), -1)
    nll = -sum(float(logp[t - 1, text_ids[t]]) for t in range(1, len(text_ids)))
    expected = math.exp(nll / (len(text_ids) - 1))  # one window holds the whole text
    value, n = _perplexity(halo("perplexity", "--gguf", d / "grok.gguf", "--text",
                                d / "text.txt", "--window", 256))
    print(f"grok perplexity: halo {value:.4f}, reference {expected:.4f} over {n} tokens")
    assert n == len(text_ids) - 1 and value == pytest.approx(expected, rel=1e-3)
