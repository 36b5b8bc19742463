"""Chat templates, sampling and streamed text, against transformers (no compiled model):
the rendered prompt and its token ids equal `apply_chat_template`'s, the sampling
distribution equals transformers' temperature/top-k/top-p warpers, streamed pieces add up
to the decoded text; bad sampling flags are one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import halo, smollm2_gguf
from test_cli_errors import assert_one_line_error

MESSAGES = {
    "user": [{"role": "user", "content": "What is the capital of France?"}],
    "system+user": [{"role": "system", "content": "You answer in one word."},
                    {"role": "user", "content": "What is the capital of France?"}],
    "multi-turn": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "Hi <b>there</b> & 'café' 日本語 🎉"},
                   {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "  spaces\n\nand\ttabs  "}],
}

# Templates that lean on transformers' environment: trim_blocks/lstrip_blocks (indented
# block tags on their own lines), namespace, tojson without HTML escaping, loop controls,
# {% generation %}, the special-token variables and raise_exception.
TEMPLATES = {
    "blocks": """{% for message in messages %}
    {% if message['role'] == 'system' %}
<<SYS>>{{ message['content'] }}<</SYS>>
    {% else %}
[{{ message['role'] | upper }}] {{ message['content'] | trim }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
[ASSISTANT]
{% endif %}""",
    "namespace": """{% set ns = namespace(users=0) %}
{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.users = ns.users + 1 %}{% endif %}{% endfor %}
{{ bos_token }}users={{ ns.users }} {{ messages | tojson }}
{% for m in messages %}
  {% if loop.index > 3 %}{% break %}{% endif %}
  {% if m.role == 'system' %}{% continue %}{% endif %}
<|im_start|>{{ m.role }}
{% generation %}{{ m.content }}{% endgeneration %}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}""",
    "llama3": """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" + system_message + "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}""",
}
GEMMA_LIKE = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
              "supported') }}{% endif %}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
              "{{ m['content'] }}<end_of_turn>\n{% endfor %}")


gguf_path = smollm2_gguf


@pytest.fixture(scope="module")
def toks():
    """(ours, transformers') tokenizers of SmolLM2's GGUF."""
    from transformers import AutoTokenizer

    from halo_mlir.params.gguf_file import GgufFile
    from halo_mlir.params.tokenizer import GgufTokenizer

    g = gguf_path()
    with GgufFile(g) as f:
        ours = GgufTokenizer(f)
    return ours, AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)


def hf_chat(hf_tok, messages, template=None, tokenize=True):
    out = hf_tok.apply_chat_template(messages, chat_template=template, tokenize=tokenize,
                                     add_generation_prompt=True)
    return out["input_ids"] if tokenize else out


@pytest.mark.parametrize("messages", MESSAGES, ids=list(MESSAGES))
def test_smollm2_chat_prompt_equals_transformers(toks, messages):
    from halo_mlir.inference.chat import ChatFormat

    ours, hf_tok = toks
    fmt = ChatFormat.of(ours)
    assert fmt.render(MESSAGES[messages]) == hf_chat(hf_tok, MESSAGES[messages], tokenize=False)
    ids = fmt.encode(ours, MESSAGES[messages])
    assert ids == hf_chat(hf_tok, MESSAGES[messages])
    assert ids.count(ours.special_id("<|im_start|>")) >= 3  # control tokens as one token each


def test_special_tokens_and_stop_ids(toks):
    from halo_mlir.inference.chat import ChatFormat

    ours, hf_tok = toks
    named = ("bos_token", "eos_token", "unk_token", "pad_token")
    assert ours.special_tokens() == {k: getattr(hf_tok, k) for k in named}
    # SmolLM2: eos is <|im_end|> (id 2), the ChatML end of turn.
    im_end = hf_tok.convert_tokens_to_ids("<|im_end|>")
    assert ChatFormat.of(ours).stop_ids == {hf_tok.eos_token_id, im_end}
    assert ours.special_id("<|im_end|>") == 2 and ours.special_id("hello") is None


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_environment_equals_transformers(toks, name):
    from halo_mlir.inference.chat import ChatFormat

    ours, hf_tok = toks
    fmt = ChatFormat(TEMPLATES[name], ours.special_tokens(), frozenset())
    for messages in MESSAGES.values():
        text = fmt.render(messages)
        assert text == hf_chat(hf_tok, messages, TEMPLATES[name], tokenize=False), name
        assert fmt.encode(ours, messages) == hf_chat(hf_tok, messages, TEMPLATES[name])


def test_template_errors_are_one_line(toks):
    from halo_mlir.inference.chat import ChatFormat
    from halo_mlir.errors import HaloError

    ours, hf_tok = toks
    gemma = ChatFormat(GEMMA_LIKE, ours.special_tokens(), frozenset())
    with pytest.raises(Exception, match="System role not supported"):
        hf_chat(hf_tok, MESSAGES["system+user"], GEMMA_LIKE, tokenize=False)
    with pytest.raises(HaloError, match="rejects these messages .System role not supported"):
        gemma.render(MESSAGES["system+user"])
    assert gemma.render(MESSAGES["user"]) == hf_chat(hf_tok, MESSAGES["user"], GEMMA_LIKE,
                                                    tokenize=False)
    no_system = ChatFormat("{% for m in messages %}{{ m.content }}{% endfor %}", {}, frozenset())
    with pytest.raises(HaloError, match="no system role"):
        no_system.render(MESSAGES["system+user"])
    with pytest.raises(HaloError, match="does not parse"):
        ChatFormat("{% for m in messages %}", {}, frozenset()).render(MESSAGES["user"])
    with pytest.raises(HaloError, match="string 'role' and 'content'"):
        no_system.render([{"role": "user"}])


# ---- sampling ----------------------------------------------------------------------------
@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 50, 1.0), (1.0, 0, 0.9), (0.8, 40, 0.95), (2.0, 5, 0.5)])
def test_sampling_distribution_equals_transformers_warpers(temperature, top_k, top_p):
    import torch
    from transformers.generation.logits_process import (TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    from halo_mlir.inference.generate import Sampling

    logits = np.random.default_rng(0).normal(0, 3, (4, 1000)).astype(np.float32)
    s = Sampling(temperature, top_p, top_k, seed=0)
    scores = TemperatureLogitsWarper(temperature)(None, torch.tensor(logits, dtype=torch.float64))
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    want = torch.softmax(scores, -1).numpy()
    for row, ref in zip(logits, want):
        ids, p = s.distribution(row)
        got = np.zeros_like(ref)
        got[ids] = p
        assert set(ids) == set(np.flatnonzero(ref)), (len(ids), np.count_nonzero(ref))
        np.testing.assert_allclose(got, ref, atol=1e-12, rtol=1e-9)


def test_sampler_draws_follow_the_distribution_and_repeat_with_a_seed():
    from halo_mlir.inference.generate import Sampling

    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    s = Sampling(1.0, top_p=0.75, seed=7)  # keeps the first two: 0.5 / 0.8, 0.3 / 0.8
    pick = s.picker()
    draws = [pick(logits) for _ in range(4000)]
    assert set(draws) == {0, 1}
    assert abs(draws.count(0) / 4000 - 0.625) < 0.03
    again = s.picker()
    assert [again(logits) for _ in range(4000)] == draws  # the seed repeats
    assert [Sampling(1.0, seed=8).picker()(logits) for _ in range(50)] != draws[:50]
    wide = np.random.default_rng(1).normal(0, 1, 500)
    one = Sampling(5.0, top_k=1, seed=3).picker()
    assert all(one(wide + i) == int(np.argmax(wide + i)) for i in range(10))  # top-k 1 is greedy


def test_text_stream_pieces_add_up_to_the_decoded_text(toks):
    from halo_mlir.inference.generate import TextStream

    ours, _ = toks
    text = "naïve café 日本語 🎉 ok\n  two spaces, ’quotes’ and ✓ done"
    ids = ours.encode(text)
    assert len(ids) > len(text.split())  # some characters span several tokens
    stream = TextStream(ours.decode)
    pieces = [stream.push(t) for t in ids] + [stream.finish()]
    assert "".join(pieces) == ours.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # it waited for the rest of a character at least once


# ---- CLI errors (before any model is opened) -----------------------------------------
@pytest.mark.parametrize("args,needle", [
    (("--temperature", "-1"), "--temperature must be a number >= 0"),
    (("--temperature", "nan"), "--temperature must be a number >= 0"),
    (("--top-p", "0"), "--top-p must be in (0, 1]"),
    (("--top-p", "1.5"), "--top-p must be in (0, 1]"),
    (("--top-k", "-2"), "--top-k must be >= 0"),
    (("--seed", "-1"), "--seed must be >= 0"),
    (("--max-tokens", "0"), "--max-tokens must be >= 1"),
    (("--raw", "--system", "Be brief."), "--system needs the chat template"),
])
def test_bad_generate_flags_are_one_line_errors(tmp_path, args, needle):
    proc = halo("generate", "--gguf", tmp_path / "missing.gguf", "--prompt", "hi", *args,
                check=False)
    assert_one_line_error(proc, needle)
    assert proc.returncode == 1 and proc.stdout == ""
