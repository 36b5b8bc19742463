"""Chat generation with SmolLM2-135M-Instruct (Q4_1 GGUF in generate's default CPU form: the
Q4_1 / Q8_0 blocks kept quantized) against
transformers loading the same GGUF: the chat prompt's tokens, greedy replies token for token
to the end-of-turn token, --raw completion, seeded sampling, streamed text, a model without
a chat template. The compiled model is shared with test_smollm2.py (one compile per
session)."""

from __future__ import annotations

import json

import pytest

from conftest import halo
from test_smollm2 import gguf_path, hf, hf_greedy, ours  # noqa: F401  (fixtures)

QUESTION = "What is the capital of France?"
CHATS = {
    "user": [{"role": "user", "content": QUESTION}],
    "system+user": [{"role": "system", "content": "You answer in one word."},
                    {"role": "user", "content": QUESTION}],
}
LIMIT = 64  # the replies end well before this


@pytest.fixture(scope="module")
def model(ours):
    from halo_mlir.inference.generate import default_keep_quantized

    gen, tok = ours(default_keep_quantized("cpu", "f32", 1))  # what the CLI runs
    yield gen, tok
    gen.close()


def hf_chat_reply(hf_model, ids: list[int]) -> list[int]:
    """transformers' greedy reply; it stops at the generation config's eos (<|im_end|>)."""
    import torch

    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=LIMIT, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("name", CHATS)
def test_greedy_chat_equals_transformers_to_the_end_of_turn(hf, model, name):
    from halo_mlir.inference.generate import chat

    hf_model, hf_tok = hf
    gen, tok = model
    ids = hf_tok.apply_chat_template(CHATS[name], add_generation_prompt=True)["input_ids"]
    want = hf_chat_reply(hf_model, ids)
    assert want[-1] == hf_tok.eos_token_id and len(want) < LIMIT  # transformers stopped
    pieces: list[str] = []
    got = chat(gen, tok, CHATS[name], LIMIT, on_text=pieces.append)
    print(f"{name}: {len(got.prompt_ids)} prompt tokens, reply {got.tokens} {got.text!r}")
    assert got.prompt_ids == ids
    assert got.tokens == want and got.stopped
    assert got.text == hf_tok.decode(want, skip_special_tokens=True)
    assert "".join(pieces) == got.text  # streamed pieces add up to the reply
    assert "Paris" in got.text


def test_cli_streams_the_reply(model):
    from halo_mlir.inference.generate import chat

    gen, tok = model
    want = chat(gen, tok, CHATS["system+user"], LIMIT)
    proc = halo("generate", "--prompt", QUESTION, "--system", "You answer in one word.")
    assert proc.stdout == want.text + "\n"
    assert f"{len(want.tokens)} generated (to stop token)" in proc.stderr
    assert "tokens/s" in proc.stderr and "note:" not in proc.stderr


def test_raw_is_plain_completion(hf, model):
    hf_model, hf_tok = hf
    _, tok = model
    prompt = "The capital of France is"
    want, _ = hf_greedy(hf_model, tok.encode(prompt), 8)
    proc = halo("generate", "--raw", "--prompt", prompt, "--max-tokens", 8)
    assert proc.stdout == prompt + hf_tok.decode(want, skip_special_tokens=True) + "\n"
    assert "8 generated (to --max-tokens)" in proc.stderr


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    from halo_mlir.inference.generate import Sampling, chat

    gen, tok = model
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    n = 16
    greedy = chat(gen, tok, messages, n).tokens
    hot = [chat(gen, tok, messages, n, sampling=Sampling(1.5, seed=s)).tokens for s in (1, 1, 2)]
    print(f"greedy {greedy}\nT=1.5 seed 1 {hot[0]}\nT=1.5 seed 2 {hot[2]}")
    assert hot[0] == hot[1]  # the same seed, the same tokens
    assert hot[0] != greedy and hot[2] != hot[0]
    top1 = chat(gen, tok, messages, n, sampling=Sampling(1.5, top_k=1, seed=5)).tokens
    assert top1 == greedy
    nucleus = chat(gen, tok, messages, n, sampling=Sampling(0.8, top_p=0.9, seed=3))
    proc = halo("generate", "--prompt", messages[0]["content"], "--max-tokens", n,
                "--temperature", 0.8, "--top-p", 0.9, "--seed", 3)
    assert proc.stdout == nucleus.text + "\n"  # the CLI samples the same way


def test_model_files_with_and_without_a_chat_template(tmp_path, model):
    """--vmfb/--tokenizer: tokenizer_config.json's chat_template is used; without one the
    prompt is continued as plain text, with one note on stderr."""
    from halo_mlir.inference.generate import build_from_gguf, chat, complete
    from halo_mlir.params.gguf_file import GgufFile

    gen, tok = model
    with GgufFile(gguf_path()) as g:
        files = build_from_gguf(g, dtype="f32", keep_quantized=True, device="cpu",
                                echo=lambda m: None)  # the cached build
    (tmp_path / "config.json").write_text(json.dumps(files.config))
    tok.save(tmp_path / "tokenizer.json")
    args = ["generate", "--vmfb", files.vmfb, "--params", files.params[0], "--config",
            tmp_path / "config.json", "--tokenizer", tmp_path / "tokenizer.json",
            "--max-tokens", 12]
    conf = {"eos_token": tok.eos_token, "bos_token": "<|im_start|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(conf))
    plain = halo(*args, "--prompt", "The capital of France is")
    assert plain.stderr.count("note: the model has no chat template") == 1
    want = complete(gen, tok, "The capital of France is", 12)
    assert plain.stdout == "The capital of France is" + want.text + "\n"
    no_system = halo(*args, "--prompt", QUESTION, "--system", "Be brief.", check=False)
    assert no_system.returncode == 1 and "no system message" in no_system.stderr

    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({**conf, "chat_template": tok.chat_template}))
    proc = halo(*args, "--prompt", QUESTION)
    assert proc.stdout == chat(gen, tok, CHATS["user"], 12).text + "\n"
    assert "note:" not in proc.stderr
