"""Chat prompts: the model's chat template rendered as transformers' `apply_chat_template`
renders it, tokenized with the template's control tokens as single tokens, and the tokens
that end the assistant's turn.

The template is Jinja (GGUF `tokenizer.chat_template`, or `chat_template` in a
tokenizer_config.json). It runs in the environment transformers builds for it: sandboxed
and immutable, `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a
`{% generation %}` block tag, `raise_exception(msg)`, `strftime_now(fmt)`, a `tojson`
filter that does not HTML-escape, `dict` and `namespace`, and the variables `messages`,
`add_generation_prompt`, `tools`, `documents` and the special tokens by name
(`bos_token`, `eos_token`, `unk_token`, `pad_token`). The rendered text is tokenized
without adding a BOS token (the template writes it when the model wants one).
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from functools import lru_cache

from halo_mlir.errors import HaloError

# Control tokens that close a turn in the common template families (ChatML, Llama 3,
# Phi 3, Gemma): a stop token when the template writes it and the vocabulary has it as a
# special token, whatever the GGUF's eos_token_id says.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")


@lru_cache(maxsize=8)
def compile_template(source: str):
    """The template compiled in transformers' environment (see the module docstring)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's text for training
        masks; rendering only emits its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            block = jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body)
            return block.set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """`namespace(...)` without underscore-prefixed attributes (as transformers)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"a chat template cannot set the attribute {name!r} on a namespace")

    class Dict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, dict=Dict(), namespace=Namespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise HaloError(f"the model's chat template does not parse (line {e.lineno}: "
                        f"{e.message}); use --raw for plain completion") from None


def check_messages(messages) -> list[dict]:
    """Plain {"role", "content"} dicts of strings (the template sees copies)."""
    if not messages:
        raise HaloError("no messages: pass at least one {'role': 'user', 'content': ...}")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise HaloError(f"a message must be a dict with string 'role' and 'content', got {m!r}")
        out.append({str(k): v for k, v in m.items() if v is not None})
    return out


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """How one model's conversations become tokens, and which tokens end its turn."""

    template: str
    special_tokens: dict[str, str]  # bos_token, eos_token, ... -> their text
    stop_ids: frozenset[int]

    @classmethod
    def of(cls, tok) -> "ChatFormat | None":
        """The tokenizer's chat format; None when it has no chat template."""
        template = getattr(tok, "chat_template", None)
        if not template:
            return None
        stop = {tok.eos_id} if tok.eos_id is not None else set()
        stop.update(i for i in (tok.eot_id,) if i is not None)
        for text in END_OF_TURN:
            i = tok.special_id(text)
            if i is not None and text in template:
                stop.add(i)
        return cls(template, tok.special_tokens(), frozenset(stop))

    @property
    def takes_system(self) -> bool:
        return "system" in self.template

    def render(self, messages, *, add_generation_prompt: bool = True) -> str:
        """The prompt text, as `apply_chat_template(..., tokenize=False)` renders it."""
        import jinja2

        messages = check_messages(messages)
        if any(m["role"] == "system" for m in messages) and not self.takes_system:
            raise HaloError("the model's chat template has no system role; drop the system "
                            "message (--system)")
        try:
            return compile_template(self.template).render(
                messages=messages, tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise HaloError(f"the model's chat template rejects these messages ({e}); change "
                            "them or use --raw") from None

    def encode(self, tok, messages) -> list[int]:
        """Token ids of the rendered prompt: control tokens in the text become their ids,
        and no BOS is added beyond what the template writes."""
        return tok.encode(self.render(messages), bos=False)
