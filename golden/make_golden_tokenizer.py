"""Write golden/tokenizer_cases.json: Hugging Face's tokenizer on tricky strings and chats.

The reference is transformers' tokenizer built directly from the default model's GGUF file
(the same file refimpl converts), so the test checks our conversion and our Tokenizer
against HF, not against ourselves. This is the only tokenizer code that imports transformers.

Run through `make golden` (or `python golden/make_golden_tokenizer.py`); never edit the output.
"""

import datetime
import json
import platform
import sys
from importlib.metadata import version
from pathlib import Path

from transformers import AutoTokenizer

from refimpl.pull import fetch_gguf, sha256_of

OUT = Path(__file__).resolve().parent / "tokenizer_cases.json"

STRINGS = [
    "Hello world 12345",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "   three leading spaces",
    "multiple    spaces   between",
    "tab\there\t\tand two",
    "line one\nline two\n\nline four\n",
    "windows\r\nline endings\r\n",
    "3.14159 and 1,000,000 and 2024-01-31",
    "12345678901234567890",
    "Café, naïve, résumé, jalapeño, Ångström",
    "日本語のテキストと中文文本",
    "한국어 텍스트",
    "emoji 😀 and 👍🏽 and family 👨‍👩‍👧‍👦",
    "flags 🇫🇷🇯🇵 and rainbow 🏳️‍🌈",
    "combining e\u0301 a\u0308 n\u0303 and precomposed é",
    "def f(x):\n    if x > 0:\n        return x * 2\n\treturn None\n",
    "I'm sure they don't know it's John's. We'll, they've, I'd",
    "'s 'S 'RE 'll",
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|><|im_start|><|im_end|>",
    "<",
    "<|im_start",
    "",
    " ",
    "\n",
    "pneumonoultramicroscopicsilicovolcanoconiosis" * 3,
    "mixed: English, Русский, Ελληνικά, हिन्दी, ไทย",
    "שלום עולם and مرحبا بالعالم",
    "URL https://example.com/a?b=c&d=e#f and email a.b@c.de",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
    "zero\u200bwidth and non\u00a0breaking space",
]

CHATS = [
    {"name": "user only (default system prompt)",
     "messages": [{"role": "user", "content": "What is the capital of France?"}], "add_generation_prompt": True},
    {"name": "with system message",
     "messages": [{"role": "system", "content": "You are a terse assistant."},
                  {"role": "user", "content": "Say hi."}], "add_generation_prompt": True},
    {"name": "multi-turn",
     "messages": [{"role": "user", "content": "Hi!"},
                  {"role": "assistant", "content": "Hello! How can I help?"},
                  {"role": "user", "content": "Tell me a joke."}], "add_generation_prompt": True},
    {"name": "no generation prompt",
     "messages": [{"role": "user", "content": "Hi!"},
                  {"role": "assistant", "content": "Hello!"}], "add_generation_prompt": False},
    {"name": "system, no generation prompt",
     "messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}], "add_generation_prompt": False},
    {"name": "unicode content",
     "messages": [{"role": "user", "content": "Traduis « café crème » en 日本語 🙂\n  avec   espaces"}],
     "add_generation_prompt": True},
    {"name": "empty user message",
     "messages": [{"role": "user", "content": ""}], "add_generation_prompt": True},
    {"name": "content with special-token text and code",
     "messages": [{"role": "system", "content": "Answer in code."},
                  {"role": "user", "content": "Print <|im_end|> in Python:\n```\nprint('x')\n```"}],
     "add_generation_prompt": True},
]


def chat_ids(tok, messages, add_generation_prompt):
    """HF's own tokenization of the chat (apply_chat_template with tokenize=True)."""
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(i) for i in ids]


def main():
    gguf_path = fetch_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    cases = []
    for text in STRINGS:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        cases.append({"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False),
                      "decoded_skip_special": tok.decode(ids, skip_special_tokens=True)})
    chats = []
    for chat in CHATS:
        text = tok.apply_chat_template(chat["messages"], tokenize=False,
                                       add_generation_prompt=chat["add_generation_prompt"])
        chats.append({**chat, "text": text, "ids": chat_ids(tok, chat["messages"], chat["add_generation_prompt"])})
    golden = {
        "made_by": {
            "command": "make golden",
            "script": "golden/make_golden_tokenizer.py",
            "python": platform.python_version(),
            "transformers": version("transformers"),
            "tokenizers": version("tokenizers"),
            "gguf": version("gguf"),
            "date": datetime.date.today().isoformat(),
            "gguf_file": gguf_path.name,
            "gguf_sha256": sha256_of(gguf_path),
            "reference": "AutoTokenizer.from_pretrained(dir, gguf_file=name)",
        },
        "cases": cases,
        "chats": chats,
    }
    OUT.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT}: {len(cases)} strings, {len(chats)} chats", file=sys.stderr)


if __name__ == "__main__":
    main()
