"""A GGUF's SentencePiece (`tokenizer.ggml.model = "llama"`) vocabulary, as llama.cpp writes
Llama 2 / Mistral / Mixtral ones, read by halo_mlir's GgufTokenizer and compared with
transformers' own GGUF tokenizer loading of the same file."""

import numpy as np
import pytest

# A small SentencePiece BPE vocabulary in llama.cpp's layout: <unk>, <s>, </s>, the 256
# byte tokens, then pieces with descending scores (U+2581 marks a space).
PIECES = ["\u2581", "e", "t", "h", "a", "i", "n", "o", "s", "r", "c", "d", "l", "u", "w", "f",
          "g", ".", ",", "\u2581t", "he", "\u2581the", "in", "\u2581a", "er", "on", "\u2581c",
          "at", "\u2581cat", "\u2581s", "it", "\u2581w", "as", "\u2581was", "\u2581in",
          "\u2581on", "\u2581sat", "re", "\u2581he", "ed", "\u2581and", "an", "nd", "\u2581an"]
TEXTS = ["the cat sat on the mat.", "The cat was in the sun, and he sat.",
         "  two  spaces and caf\u00e9 \u00fcber", "x", "", "<s>the</s> cat"]


def write_spm_gguf(path, add_space_prefix=None):
    import gguf

    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *PIECES]
    types = [2, 3, 3, *[6] * 256, *[1] * len(PIECES)]  # unknown, control, byte, normal
    scores = [0.0, 0.0, 0.0, *[0.0] * 256, *[-float(i) for i in range(len(PIECES))]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens


def test_sentencepiece_vocabulary_encodes_as_transformers(tmp_path):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        convert_gguf_tokenizer, get_gguf_tokenizer)

    from halo_mlir.params.gguf_file import GgufFile
    from halo_mlir.params.tokenizer import GgufTokenizer

    path = tmp_path / "spm.gguf"
    tokens = write_spm_gguf(path)
    arch, tok_dict, tok_config = get_gguf_tokenizer(str(path))
    ref, _ = convert_gguf_tokenizer(arch, tok_dict)
    with GgufFile(path) as g:
        ours = GgufTokenizer(g)
    assert ours.add_bos and tok_config["add_bos_token"] and ours.bos_id == 1
    for text in TEXTS:
        want = ref.encode(text, add_special_tokens=False).ids
        got = ours.encode(text, bos=False)
        assert got == want, (text, [tokens[i] for i in got], [tokens[i] for i in want])
        assert ours.encode(text) == [1, *want]
        assert ours.decode(got) == ref.decode(want, skip_special_tokens=True), text
    # the merges and byte fallback are exercised: whole words, and bytes for é / ü
    cat = ours.encode("the cat sat", bos=False)
    assert [tokens[i] for i in cat] == ["\u2581the", "\u2581cat", "\u2581sat"]
    assert "<0xC3>" in [tokens[i] for i in ours.encode("caf\u00e9", bos=False)]
    assert ours.decode(ours.encode(TEXTS[1], bos=False)) == TEXTS[1]


def test_no_space_prefix(tmp_path):
    from halo_mlir.params.gguf_file import GgufFile
    from halo_mlir.params.tokenizer import GgufTokenizer

    tokens = write_spm_gguf(tmp_path / "spm.gguf", add_space_prefix=False)
    with GgufFile(tmp_path / "spm.gguf") as g:
        ours = GgufTokenizer(g)
    assert [tokens[i] for i in ours.encode("the cat", bos=False)] == ["t", "he", "\u2581cat"]
    assert ours.decode(ours.encode("the cat", bos=False)) == "the cat"
