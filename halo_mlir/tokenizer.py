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


class GgufTokenizer:
    """encode(text) -> ids, decode(ids) -> text, eos/bos ids, and `save(tokenizer.json)`."""

    def __init__(self, g):
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

        kind = g.get("tokenizer.ggml.model")
        if kind is None:
            raise HaloError(f"{g.path}: the GGUF has no tokenizer (tokenizer.ggml.model "
                            "missing); pass --vmfb/--params/--config with --tokenizer instead")
        if kind != "gpt2":
            raise HaloError(f"{g.path}: tokenizer model {kind!r} is not supported; supported: "
                            "gpt2 (byte-level BPE, as Llama 3 and SmolLM use)")
        tokens = list(g.require("tokenizer.ggml.tokens"))
        merges = [tuple(m.split(" ", 1)) for m in g.require("tokenizer.ggml.merges")]
        types = list(g.get("tokenizer.ggml.token_type") or [])
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
        tk.add_special_tokens([AddedToken(t, normalized=False, special=True)
                               for t, k in zip(tokens, types) if k == CONTROL and set(t) <= spelled])
        tk.add_tokens([AddedToken(t, normalized=False, special=False)
                       for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab])
        self.tokenizer = tk
        self.tokens = tokens
        self.bos_id = g.get("tokenizer.ggml.bos_token_id")
        self.eos_id = g.get("tokenizer.ggml.eos_token_id")
        self.eot_id = g.get("tokenizer.ggml.eot_token_id")
        self.add_bos = bool(g.get("tokenizer.ggml.add_bos_token", False))
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
