"""Constrained decoding: an output that matches a grammar by construction.

A JSON schema, "any JSON object", or the shape of a tool call is compiled into a grammar by
llguidance (the grammar engine mistral.rs, llama.cpp and vLLM use; chosen by measurement, see
bench/bench_grammar.py). At every step the grammar says which tokens may come next: the sampler
gives every other token probability 0 before it draws (sampling.py, step 4), and the chosen token
advances the grammar. Each choice of a request follows the grammar on its own (a Matcher each).

What the user is promised: the text of a finished choice matches the grammar, because no token
that leaves it could be drawn; the end-of-sequence token is allowed only where the grammar may
end. A choice cut by max_tokens (finish_reason "length") may stop in the middle: valid JSON
cannot be promised then. The log-probabilities reported stay the model's raw distribution.

JSON is written compactly, one way only: ", " between items, ": " after keys, no other
whitespace. A flexible-whitespace grammar lets a small model loop on newlines forever.
"""

import json
from dataclasses import dataclass

import numpy as np
from llguidance import LLMatcher, LLTokenizer

# How the grammar engine writes JSON: the separators OpenAI's own JSON mode uses, no free whitespace.
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"  # Hermes-style calls (tools.py in webapp)


class GrammarError(ValueError):
    """A schema or grammar the engine cannot compile; the message names the problem."""


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar for one request: each choice starts its own Matcher from it."""

    source: str  # llguidance's grammar (JSON or Lark form)
    tokenizer: object  # the LLTokenizer it was checked against

    def matcher(self):
        return Matcher(LLMatcher(self.tokenizer, self.source, log_level=0))


class Matcher:
    """Where one choice is in its grammar: which tokens may come next, and the token that came."""

    def __init__(self, matcher):
        self.m = matcher

    def allowed(self, vocab_size):
        """A [vocab_size] bool mask of the tokens the grammar allows next. Rows past the
        tokenizer's vocabulary (padding of the embedding matrix) are never allowed."""
        bits = np.frombuffer(self.m.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little").astype(bool)
        if mask.size < vocab_size:
            mask = np.concatenate([mask, np.zeros(vocab_size - mask.size, dtype=bool)])
        return mask[:vocab_size]

    def advance(self, token):
        if not self.m.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.m.get_error()}")

    @property
    def finished(self):
        """The grammar has ended: it took its end-of-sequence token, and allows nothing more."""
        return self.m.is_stopped()


class Grammars:
    """The grammar engine's view of one model's tokenizer: every token's bytes, and which tokens
    end a sequence. Built once per model (about half a second for 49k tokens)."""

    def __init__(self, tokenizer, vocab_size, stop_ids):
        # The end-of-sequence tokens are allowed where the grammar may end. A model without any (rare:
        # test models that never stop) gets the tokenizer's own; its choices end when the grammar does.
        self.tokenizer = LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                     eos_token=sorted(stop_ids) or None)

    def compile(self, source):
        """A Grammar, or GrammarError with the engine's message."""
        matcher = LLMatcher(self.tokenizer, source, log_level=0)
        if matcher.is_error():
            raise GrammarError(one_line(matcher.get_error()))
        return Grammar(source, self.tokenizer)

    def json_object(self):
        """OpenAI's JSON mode: any JSON object."""
        return self.compile(json_grammar({"type": "object"}))

    def json_schema(self, schema):
        """Output valid against a JSON schema (a dict)."""
        return self.compile(json_grammar(schema))

    def tool_calls(self, tools, required, parallel):
        """Tool calls in Hermes' form: <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>, one
        or more (parallel) in a row, each naming one of `tools` ({name: parameters schema}) with
        arguments valid against its parameters. Unless `required`, plain text instead is allowed too:
        text in which no call begins, so that every call in a reply is one the grammar checked."""
        one_of = [{"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
                   "required": ["name", "arguments"], "additionalProperties": False}
                  for name, parameters in tools.items()]
        call = {"oneOf": one_of} if len(one_of) > 1 else one_of[0]
        calls = 'call ("\\n" call)*' if parallel else "call"  # calls one per line
        text = "" if required else " | TEXT"
        lark = "\n".join([
            f"start: calls{text}",
            f"calls: {calls}",
            f"call: {json.dumps(TOOL_CALL_OPEN)} body {json.dumps(TOOL_CALL_CLOSE)}",
            f"body: %json{json.dumps({**call, 'x-guidance': JSON_OPTIONS})}",
            f"TEXT: /(.|\\n)+/ & ~/(.|\\n)*{regex_literal(TOOL_CALL_OPEN.strip())}(.|\\n)*/",
        ])
        return self.compile(lark)


def json_grammar(schema):
    """llguidance's JSON-schema grammar, with JSON_OPTIONS."""
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    try:
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as error:
        raise GrammarError(one_line(str(error))) from None


def regex_literal(text):
    """text as a regex that matches it literally (not < or >: escaped, they are word boundaries)."""
    return "".join(f"\\{c}" if c in r"\/.^$*+?()[]{}|" else c for c in text)


def one_line(message, limit=300):
    """The engine's message on one line (its regex errors draw a caret under the pattern)."""
    text = " ".join(message.split()) or "the grammar could not be compiled"
    return text if len(text) <= limit else text[:limit - 3] + "..."
