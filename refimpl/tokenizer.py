"""Text <-> token ids, and chat messages -> prompt text.

The tokenizer itself is the `tokenizers` library reading the model directory's tokenizer.json
(for the default model: byte-level BPE, built by gguf_import to match transformers token for
token). This module only adds what tokenizer.json does not carry, from tokenizer_config.json:

- BOS. `encode` adds no special tokens of its own accord; it prepends BOS only when the
  config says `add_bos_token`, so the rule is visible here rather than hidden in tokenizer.json.
- The chat template: a Jinja2 program shipped with the model that turns a list of messages
  into the exact prompt text the model was trained on. It is rendered as transformers renders
  it (trim_blocks, lstrip_blocks, loop controls, a `tojson` that does not HTML-escape, a
  `raise_exception` helper). Templates come from model files we did not write, so they run in
  Jinja2's immutable sandbox: a template can format strings, not reach Python internals.

`encode_chat` tokenizes the rendered prompt without adding BOS: the template writes every
special token it wants itself (transformers' apply_chat_template does the same).
"""

import json
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer


class ChatTemplateError(ValueError):
    """A chat template refused the conversation (its raise_exception), or there is no template."""


class Tokenizer:
    """A model's tokenizer and chat template, read from its HF-layout directory."""

    def __init__(self, backend, config):
        self.backend = backend
        self.config = config
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token = config.get("bos_token")
        self.eos_token = config.get("eos_token")
        self.bos_token_id = self._token_id(self.bos_token)
        self.eos_token_id = self._token_id(self.eos_token)
        self.add_bos_token = bool(config.get("add_bos_token", False))
        # Special (control) tokens: skipped by decode(skip_special_tokens=True), and what a
        # caller checks to hide markers like <|im_end|> from the user.
        self.special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.byte_level = type(backend.decoder).__name__ == "ByteLevel"
        self.chat_template = config.get("chat_template")
        self._template = compile_template(self.chat_template) if self.chat_template else None
        # Whether the template renders a `tools` list itself (Qwen, Llama 3.1, Hermes); for the others a
        # server describes the tools in a system message (webapp/tools.py).
        self.template_takes_tools = bool(self.chat_template) and "tools" in self.chat_template

    @classmethod
    def from_dir(cls, path):
        """Load tokenizer.json and tokenizer_config.json from a model directory."""
        path = Path(path)
        backend = BackendTokenizer.from_file(str(path / "tokenizer.json"))
        config_path = path / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        return cls(backend, config)

    def _token_id(self, token):
        """The id of a special token's text, or None when the config names none."""
        if token is None:
            return None
        if isinstance(token, dict):  # older configs spell an AddedToken as {"content": ...}
            token = token["content"]
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} from tokenizer_config.json is not in the vocabulary")
        return token_id

    def encode(self, text):
        """Token ids of text; BOS first only when the config says add_bos_token."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if self.add_bos_token else ids

    def decode(self, ids, skip_special_tokens=False):
        """The text of token ids (special tokens written out unless skipped)."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt=True, tools=None):
        """Render messages ([{"role": ..., "content": ...}, ...]) into the model's prompt text;
        `tools` (OpenAI's function tools) go to the templates that take them."""
        if self._template is None:
            raise ChatTemplateError("this model has no chat template (no chat_template in tokenizer_config.json)")
        return self._template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **({"tools": tools} if tools else {}),
        )

    def token_bytes(self, token_id):
        """The exact UTF-8 bytes one token stands for (a token may hold part of a character).

        Special tokens contribute no bytes: like vLLM and OpenAI, generated text never shows
        control markers such as <|im_end|>.
        """
        if token_id in self.special_ids:
            return b""
        piece = self.backend.id_to_token(token_id)
        if piece is None:  # embedding rows padded past the tokenizer's vocabulary stand for no text
            return b""
        if self.byte_level:  # GPT-2 byte-level BPE spells each byte as one printable character
            return bytes(BYTE_OF_CHAR[c] for c in piece)
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # SentencePiece byte fallback
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")  # SentencePiece writes a space as U+2581

    def encode_chat(self, messages, add_generation_prompt=True, tools=None):
        """Token ids of the rendered chat; the template already wrote the special tokens."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools)
        return self.backend.encode(text, add_special_tokens=False).ids


def byte_alphabet():
    """GPT-2's bytes_to_unicode: each byte -> a printable character (space -> 'Ġ', newline -> 'Ċ').

    Byte-level BPE vocabularies spell every token in this alphabet."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:  # control bytes and space are moved past 255, in byte order
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


BYTE_OF_CHAR = {c: b for b, c in byte_alphabet().items()}


def raise_exception(message):
    """Exposed to templates, which call it to reject a conversation (e.g. roles out of order)."""
    raise ChatTemplateError(f"chat template error: {message}")


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """Like transformers' filter: plain json.dumps, no HTML escaping (Jinja2's would turn < into \\u003c)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source):
    """Compile a chat template once, in a sandbox, with transformers' settings."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(f"chat template does not compile: {err}") from err
