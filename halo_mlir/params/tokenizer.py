"""A tokenizer from GGUF metadata, built with the `tokenizers` library (no torch).

llama.cpp's byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`: Llama 3, SmolLM,
...) become a `tokenizers.Tokenizer` with the file's vocabulary and merges, the split
regex its `tokenizer.ggml.pre` names, and its control tokens as special tokens: the same
construction transformers uses for `from_pretrained(..., gguf_file=...)`.
"""

from __future__ import annotations

from functools import lru_cache

from halo_mlir.errors import HaloError

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> split regex; others use GPT-2's byte-level regex.
PRE_TOKENIZER_SPLITS = {name: _LLAMA3_SPLIT for name in (
    "llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")}

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the byte-level alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def _byte_level_bpe(g, tokens: list[str]):
    """(tokenizer, vocab) of a `gpt2` vocabulary: byte-level BPE with the file's merges and
    the split regex its `tokenizer.ggml.pre` names."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = [tuple(m.split(" ", 1)) for m in g.require("tokenizer.ggml.merges")]
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab = {(t if set(t) <= spelled else "".join(alphabet[c] for c in t.encode())): i
             for i, t in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(g.get("tokenizer.ggml.pre"))
    if split:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return tk, vocab


def sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every split of a token into two
    tokens, the merges of higher-scored tokens first (of one token, the longer left piece
    first, then by the pieces' ids)."""
    ids = {t: i for i, t in enumerate(tokens)}
    found = []
    for t, score in zip(tokens, scores):
        pairs = sorted(((t[:n], t[n:]) for n in range(1, len(t))
                        if t[:n] in ids and t[n:] in ids), key=lambda p: (ids[p[0]], ids[p[1]]))
        found += [(-float(score), -len(a), -len(b), len(found) + j, a, b)
                  for j, (a, b) in enumerate(pairs)]
    return [(a, b) for *_, a, b in sorted(found)]


def _sentencepiece_bpe(g, tokens: list[str]):
    """A `llama` (SentencePiece BPE) vocabulary: merges from the file or from the token
    scores, unknown characters as their UTF-8 bytes (`<0xNN>` tokens), spaces as U+2581 with
    one before the text unless `tokenizer.ggml.add_space_prefix` is false."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if g.get("tokenizer.ggml.merges") is not None:
        merges = [tuple(m.split(" ", 1)) for m in g.get("tokenizer.ggml.merges")]
    else:
        merges = sentencepiece_merges(tokens, list(g.require("tokenizer.ggml.scores")))
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                              fuse_unk=True, byte_fallback=True))
    prefix = bool(g.get("tokenizer.ggml.add_space_prefix", True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", split=False,
                                                prepend_scheme="first" if prefix else "never")
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tk


class GgufTokenizer:
    """encode(text) -> ids, decode(ids) -> text, eos/bos ids, and `save(tokenizer.json)`."""

    def __init__(self, g):
        from tokenizers import AddedToken

        kind = g.get("tokenizer.ggml.model")
        if kind is None:
            raise HaloError(f"{g.path}: the GGUF has no tokenizer (tokenizer.ggml.model "
                            "missing); pass --vmfb/--params/--config with --tokenizer instead")
        if kind not in ("gpt2", "llama"):
            raise HaloError(f"{g.path}: tokenizer model {kind!r} is not supported; supported: "
                            "gpt2 (byte-level BPE, as Llama 3 and SmolLM use) and llama "
                            "(SentencePiece BPE, as Llama 2, Mistral and Mixtral use)")
        tokens = list(g.require("tokenizer.ggml.tokens"))
        types = list(g.get("tokenizer.ggml.token_type") or [])
        if kind == "llama":
            tk = _sentencepiece_bpe(g, tokens)
            control = [t for t, k in zip(tokens, types) if k == CONTROL]
        else:
            tk, _ = _byte_level_bpe(g, tokens)
            spelled = set(_byte_alphabet().values())
            control = [t for t, k in zip(tokens, types) if k == CONTROL and set(t) <= spelled]
        tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
        vocab = tk.get_vocab()
        tk.add_tokens([AddedToken(t, normalized=False, special=False)
                       for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab])
        self.tokenizer = tk
        self.tokens = tokens
        self.bos_id = g.get("tokenizer.ggml.bos_token_id")
        self.eos_id = g.get("tokenizer.ggml.eos_token_id")
        self.eot_id = g.get("tokenizer.ggml.eot_token_id")
        # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
        self.add_bos = bool(g.get("tokenizer.ggml.add_bos_token", kind == "llama"))
        self.chat_template = g.get("tokenizer.chat_template")
        # The special tokens a chat template sees by name (transformers' GGUF loading
        # names the same ids).
        self._named = {name: g.get(f"tokenizer.ggml.{key}_token_id") for name, key in
                       (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                        ("pad_token", "padding"))}

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        """Token ids of `text`; control tokens written in it become their ids. `bos=False`:
        never prepend BOS (a chat template writes its own)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        add = bos and self.add_bos and self.bos_id is not None
        return [self.bos_id, *ids] if add else ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.tokens[self.eos_id]

    def special_id(self, text: str) -> int | None:
        """The id of `text` when it is one special (control) token of the vocabulary."""
        i = self.tokenizer.token_to_id(text)
        added = self.tokenizer.get_added_tokens_decoder()
        return i if i is not None and i in added and added[i].special else None

    def special_tokens(self) -> dict[str, str]:
        """{"bos_token": text, ...} for the special tokens the model names."""
        return {name: self.tokens[i] for name, i in self._named.items()
                if i is not None and 0 <= i < len(self.tokens)}

    def save(self, path) -> None:
        """tokenizer.json (HF `tokenizers` format), e.g. for shortfin."""
        self.tokenizer.save(str(path))


class JsonTokenizer:
    """A tokenizer.json (+ tokenizer_config.json beside it for bos/eos), same interface."""

    def __init__(self, path):
        import json
        from pathlib import Path

        from tokenizers import Tokenizer

        path = Path(path)
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:
            raise HaloError(f"{path}: not a tokenizer.json ({e})") from None
        conf_path = path.with_name("tokenizer_config.json")
        conf = json.loads(conf_path.read_text()) if conf_path.exists() else {}
        text = lambda t: t if isinstance(t, str) or t is None else t.get("content")  # noqa: E731
        self._named = {name: text(conf.get(name)) for name in
                       ("bos_token", "eos_token", "unk_token", "pad_token")}
        token_id = lambda t: None if t is None else self.tokenizer.token_to_id(t)  # noqa: E731
        self.eos_id = token_id(self._named["eos_token"])
        self.bos_id = token_id(self._named["bos_token"])
        self.eot_id = None
        self.add_bos = bool(conf.get("add_bos_token", False))
        self.chat_template = conf.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: the default one
            self.chat_template = {t.get("name"): t.get("template")
                                  for t in self.chat_template}.get("default")

    encode = GgufTokenizer.encode
    decode = GgufTokenizer.decode
    special_id = GgufTokenizer.special_id

    def special_tokens(self) -> dict[str, str]:
        return {name: t for name, t in self._named.items() if t is not None}
