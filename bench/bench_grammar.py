"""Grammar engines for constrained decoding (response_format json_object / json_schema, tool calls),
measured on this CPU with the default model's 49,152-token vocabulary: llguidance, xgrammar and
outlines-core, each imported if installed (a missing one is reported as such).

For each engine and each schema of SCHEMAS (from "any object" to a recursive one, then keywords an
engine may refuse or ignore):
  - coverage: does the schema compile, and the error text when it does not;
  - compile time: from the schema to a matcher ready for its first mask (llguidance:
    grammar_from_json_schema + LLMatcher; xgrammar: compile_json_schema, its cache off, +
    GrammarMatcher; outlines-core: build_regex_from_schema + Index + Guide); the first mask apart,
    since llguidance builds its lexer lazily and pays there;
  - mask cost: one constrained walk of up to MAX_STEPS tokens. At each step the engine fills a
    bitmask of allowed tokens (timed: median and p90 per token, through each engine's Python API),
    a token is chosen among the allowed ones, and the matcher advances (timed apart). The choice is
    the same function of the mask for every engine, so that equal masks give equal paths: the
    allowed token with the highest score in a vector drawn per step from a NumPy generator seeded
    with (seed, step), where "closing" tokens (only the characters "}]@:) and EOS score 1 higher
    with a probability that grows from 0.1 by 1/200 per step, so that walks end. A walk ends when
    EOS (<|im_end|>, id 2) is taken;
  - validity: the walked text must be UTF-8 JSON valid against the schema under jsonschema, formats
    checked (date-time as RFC 3339; patterns as ECMA-262, where \\d is [0-9]): the timed walk and
    --walks - 1 more seeds, in round 1;
  - agreement: llguidance's walk is fed to each other engine, the masks compared step by step.
All engines emit compact JSON (no whitespace; "," and ":"), so that their masks are comparable.
Each figure is the median of --rounds rounds; in round r the engine order is rotated by r, and each
schema is compiled and walked by every engine in turn, so that all meet the same load on a shared
machine. A compile over SLOW_COMPILE_S is done in round 1 only and reused (its figure is round 1's).
For scale, per token: refimpl's sampler on one [V] row (temperature 1, top_p 0.95), and applying a
bitmask to a logits row with NumPy. Last, the grammar inside refimpl's own decoding (llguidance, as
refimpl/grammar.py uses it): the default model generates under a JSON schema and without one, in
alternated rounds; ms per decoded token of each (after the first token: the prefill apart), and the
grammar step's own time per token (Matcher.allowed and Matcher.advance, timed where they are called).

Usage: PYTHONPATH=<where the engines are> python bench/bench_grammar.py [--rounds 3] [--walks 4]
"""

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import time
from pathlib import Path

import numpy as np

from refimpl.pull import pull
from refimpl.sampling import SamplingParams, sample

V, EOS, MAX_STEPS = 49152, 2, 256  # the default model's vocabulary and chat EOS (<|im_end|>)
WORDS = (V + 31) // 32  # int32 words of a bitmask: bit i of word i // 32 allows token i
SLOW_COMPILE_S = 5.0
CLOSE_P, CLOSE_RAMP = 0.1, 200  # closing tokens are preferred with probability 0.1 + step / 200

_POINT = {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]}
SCHEMAS = [
    ("any object (json_object)", {"type": "object"}),
    ("flat str/int/bool", {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"}, "active": {"type": "boolean"}},
        "required": ["name", "age", "active"]}),
    ("enum", {"type": "object", "properties": {
        "unit": {"enum": ["celsius", "fahrenheit"]}, "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "level": {"enum": [1, 2, 3, None]}}, "required": ["unit", "color", "level"]}),
    ("array min/maxItems", {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "scores": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}},
        "required": ["tags", "scores"]}),
    ("nested required", {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": {"type": "string"}, "address": {"type": "object", "properties": {
            "city": {"type": "string"}, "zip": {"type": "string"}}, "required": ["city", "zip"]}},
        "required": ["name", "address"]}}, "required": ["user"]}),
    ("string pattern", {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "phone": {"type": "string", "pattern": "^\\+?\\d{7,12}$"}}, "required": ["code", "phone"]}),
    ("number min/max/exclusive", {"type": "object", "properties": {
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "count": {"type": "integer", "minimum": 1, "maximum": 100},
        "temp": {"type": "number", "exclusiveMinimum": -273.15, "exclusiveMaximum": 1000}},
        "required": ["score", "count", "temp"]}),
    ("anyOf", {"type": "object", "properties": {
        "value": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
        "shape": {"anyOf": [
            {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}},
             "required": ["kind", "r"]},
            {"type": "object", "properties": {"kind": {"const": "rect"}, "w": {"type": "number"},
                                              "h": {"type": "number"}}, "required": ["kind", "w", "h"]}]}},
        "required": ["value", "shape"]}),
    ("$ref/$defs", {"$defs": {"point": _POINT}, "type": "object", "properties": {
        "start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}}, "required": ["start", "end"]}),
    ("additionalProperties false", {"type": "object", "properties": {
        "id": {"type": "integer"}, "note": {"type": "string"}}, "required": ["id"], "additionalProperties": False}),
    ("format date-time/email", {"type": "object", "properties": {
        "when": {"type": "string", "format": "date-time"}, "email": {"type": "string", "format": "email"}},
        "required": ["when", "email"]}),
    ("minLength/maxLength", {"type": "object", "properties": {
        "title": {"type": "string", "minLength": 3, "maxLength": 12},
        "code": {"type": "string", "minLength": 4, "maxLength": 4}}, "required": ["title", "code"]}),
    ("tool call", {"type": "object", "properties": {
        "name": {"const": "get_weather"},
        "arguments": {"type": "object", "properties": {
            "location": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["location", "unit"], "additionalProperties": False}},
        "required": ["name", "arguments"], "additionalProperties": False}),
    ("recursive", {"$defs": {"node": {"type": "object", "properties": {
        "value": {"type": "integer"},
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 3}},
        "required": ["value", "children"]}}, "$ref": "#/$defs/node"}),
    # Beyond the common set: what a user's schema may hold, and an engine may ignore or refuse.
    ("allOf", {"allOf": [
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}]}),
    ("oneOf", {"type": "object", "properties": {"pet": {"oneOf": [
        {"type": "object", "properties": {"type": {"const": "cat"},
                                          "lives": {"type": "integer", "minimum": 0, "maximum": 9}},
         "required": ["type", "lives"], "additionalProperties": False},
        {"type": "object", "properties": {"type": {"const": "dog"}, "breed": {"type": "string"}},
         "required": ["type", "breed"], "additionalProperties": False}]}}, "required": ["pet"]}),
    ("prefixItems tuple", {"type": "object", "properties": {"row": {
        "type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}, {"type": "boolean"}],
        "items": False}}, "required": ["row"]}),
    ("map min/maxProperties", {"type": "object", "additionalProperties": {"type": "integer"},
                               "minProperties": 1, "maxProperties": 3}),
    ("uniqueItems", {"type": "object", "properties": {"ids": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 3}, "uniqueItems": True,
        "minItems": 3, "maxItems": 3}}, "required": ["ids"]}),
    ("multipleOf", {"type": "object", "properties": {"step": {"type": "integer", "multipleOf": 5},
                                                     "price": {"type": "number", "multipleOf": 0.25}},
                    "required": ["step", "price"]}),
    ("format uuid/date/uri", {"type": "object", "properties": {
        "id": {"type": "string", "format": "uuid"}, "day": {"type": "string", "format": "date"},
        "site": {"type": "string", "format": "uri"}}, "required": ["id", "day", "site"]}),
    ("if/then/else", {"type": "object", "properties": {"kind": {"enum": ["a", "b"]}, "n": {"type": "integer"}},
                      "required": ["kind", "n"], "if": {"properties": {"kind": {"const": "a"}}},
                      "then": {"properties": {"n": {"minimum": 10}}}, "else": {"properties": {"n": {"maximum": -10}}}}),
]


def byte_vocab(model_dir):
    """Each token id's bytes (None for special tokens), from tokenizer.json's byte-level spelling."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):  # GPT-2's bytes_to_unicode: the other bytes map to chr(256 + n)
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    char_byte = {chr(c): b for b, c in zip(bs, cs)}
    tj = json.loads(Path(model_dir, "tokenizer.json").read_text())
    vocab = [None] * V
    for text, i in tj["model"]["vocab"].items():
        vocab[i] = bytes(char_byte[c] for c in text)
    for t in tj["added_tokens"]:
        if t["special"]:
            vocab[t["id"]] = None
    return vocab


# Engines. Each: __init__ builds the tokenizer side (timed as setup); compile(schema) -> an object
# that matcher_from() turns into a _Matcher: fill(bitmask int32[1, WORDS]), advance(token) -> ok.
# json_object mode is the schema {"type": "object"} for all three (outlines-core: a regex that nests
# objects and arrays at most 3 deep, its max_recursion_depth, and takes seconds to index).

class LLGuidance:
    name = "llguidance"
    OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}

    def __init__(self, model_dir, vocab):
        from llguidance import LLMatcher, LLTokenizer
        from llguidance.numpy import fill_next_token_bitmask
        self.version = _dist_version("llguidance")
        self.LLMatcher, self.fill = LLMatcher, fill_next_token_bitmask
        t0 = time.perf_counter()
        # The tokenizer.json text itself; EOS given, else it takes the tokenizer's own (<|endoftext|>).
        self.tok = LLTokenizer(Path(model_dir, "tokenizer.json").read_text(), n_vocab=V, eos_token=EOS)
        self.setup_s = time.perf_counter() - t0

    def compile(self, schema):
        grammar = self.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=self.OPTIONS)
        matcher = self.LLMatcher(self.tok, grammar, log_level=0)
        if matcher.is_error():  # errors are a state, not an exception
            raise ValueError(matcher.get_error())
        return [grammar, matcher]  # building the matcher is the compilation: the first walk takes it

    def matcher_from(self, compiled):
        matcher = compiled.pop() if len(compiled) > 1 else self.LLMatcher(self.tok, compiled[0], log_level=0)
        return _Matcher(lambda bm: self.fill(matcher, bm), matcher.consume_token, matcher.compute_ff_bytes)


class XGrammar:
    name = "xgrammar"

    def __init__(self, model_dir, vocab):
        import xgrammar as xgr
        self.xgr, self.version = xgr, _dist_version("xgrammar")
        t0 = time.perf_counter()
        # TokenizerInfo.from_huggingface(AutoTokenizer...) finds no special token in this vocabulary
        # and lets <|im_start|> and the like stand for their text inside strings. Built from the
        # byte-level spelling with "" for the special tokens, it leaves them out as the others do.
        tj = json.loads(Path(model_dir, "tokenizer.json").read_text())
        encoded = [""] * V
        for text, i in tj["model"]["vocab"].items():
            encoded[i] = "" if vocab[i] is None else text
        self.info = xgr.TokenizerInfo(encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=V, stop_token_ids=[EOS])
        # The cache off, or every round after the first would time a cache hit.
        self.compiler = xgr.GrammarCompiler(self.info, cache_enabled=False)
        self.setup_s = time.perf_counter() - t0

    def compile(self, schema):
        # strict_mode=False follows JSON Schema, as llguidance does: properties beside those listed are
        # allowed unless additionalProperties forbids them; the default strict mode forbids them always.
        # Without separators, any_whitespace=False means ", " and ": ".
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                 separators=(",", ":"), strict_mode=False)

    def matcher_from(self, compiled):
        matcher = self.xgr.GrammarMatcher(compiled)
        return _Matcher(matcher.fill_next_token_bitmask, matcher.accept_token)  # numpy via DLPack


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, model_dir, vocab):
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema
        self.oc, self.regex, self.version = outlines_core, build_regex_from_schema, _dist_version("outlines_core")
        t0 = time.perf_counter()
        # Keys are the tokens' bytes (a str key would be taken as UTF-8 text, wrong for the
        # byte-level spelling); special tokens left out; EOS given apart and not in the map.
        by_bytes = {}
        for i, b in enumerate(vocab):
            if b is not None:
                by_bytes.setdefault(b, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(EOS, by_bytes)
        self.setup_s = time.perf_counter() - t0

    def compile(self, schema):
        return self.oc.Index(self.regex(json.dumps(schema), ""), self.vocabulary)  # "": no whitespace

    def matcher_from(self, compiled):
        guide = self.oc.Guide(compiled)

        def advance(token):  # a final state allows EOS in its mask, but advance(EOS) raises there
            if token == EOS and guide.is_finished():
                return True
            try:
                guide.advance(token, return_tokens=False)
            except ValueError:  # a token not allowed
                return False
            return True
        return _Matcher(lambda bm: guide.write_mask_into(bm.ctypes.data, bm.size, 4), advance)


ENGINES = [LLGuidance, XGrammar, OutlinesCore]


class _Matcher:
    def __init__(self, fill, advance, forced=None):
        self.fill, self.advance, self.forced = fill, advance, forced


def _dist_version(name):
    from importlib.metadata import version
    try:
        return version(name)
    except Exception:
        return "?"


def unpack(bm):
    return np.unpackbits(bm.view(np.uint8), bitorder="little")[:V].view(bool)


def walk(matcher, seed, closers, record=False):
    """One constrained walk; returns tokens, status, mask ns per step, advance ns per step, masks."""
    bm = np.zeros((1, WORDS), np.int32)
    tokens, mask_ns, adv_ns, masks = [], [], [], []
    status = "unfinished"
    for step in range(MAX_STEPS):
        bm.fill(0)
        t0 = time.perf_counter_ns()
        matcher.fill(bm)
        t1 = time.perf_counter_ns()
        mask_ns.append(t1 - t0)
        allowed = unpack(bm)
        if record:
            masks.append(bm.copy())
        if not allowed.any():
            status = "empty mask"
            break
        rng = np.random.default_rng((seed, step))
        scores = rng.random(V, dtype=np.float32)
        if rng.random() < CLOSE_P + step / CLOSE_RAMP:
            scores[closers] += 1
        token = int(np.argmax(np.where(allowed, scores, -1)))
        t2 = time.perf_counter_ns()
        ok = matcher.advance(token)
        adv_ns.append(time.perf_counter_ns() - t2)
        if not ok:
            status = f"rejected its own token {token}"
            break
        if token == EOS:
            status = "done"
            break
        tokens.append(token)
    return tokens, status, mask_ns, adv_ns, masks


def validator():
    """check(schema, text) -> None when text is JSON valid against schema, else what is wrong;
    None when jsonschema is not installed."""
    try:
        import jsonschema
    except ImportError:
        return None
    checker = jsonschema.FormatChecker()
    rfc3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt](\d\d):\d\d:(\d\d)(\.\d+)?([Zz]|[+-]\d\d:\d\d)", re.ASCII)

    @checker.checks("date-time", raises=ValueError)
    def date_time(s):  # jsonschema checks date-time only with rfc3339-validator installed
        if isinstance(s, str):
            m = rfc3339.fullmatch(s)
            if not m:
                raise ValueError("not RFC 3339")
            leap = m[2] == "60"  # a leap second: RFC 3339 allows it, Python's datetime does not
            datetime.datetime.fromisoformat((s[:m.start(2)] + "59" + s[m.end(2):] if leap else s).upper()
                                            .replace("Z", "+00:00"))
        return True

    def ecma_pattern(validator, pattern, instance, schema):
        # JSON Schema's patterns are ECMA-262 regexes: \d is [0-9] there, any Unicode digit in Python's re.
        if validator.is_type(instance, "string") and not re.search(pattern, instance, re.ASCII):
            yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")

    Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": ecma_pattern})

    def check(schema, text):
        try:
            instance = json.loads(text)
        except ValueError as e:
            return f"not JSON: {e}"
        errors = sorted(Validator(schema, format_checker=checker).iter_errors(instance), key=lambda e: list(e.path))
        return f"{errors[0].message} at {list(errors[0].path)}" if errors else None
    return check


def verdict(vocab, schema, tokens, status, check):
    """'valid', 'unfinished', or what is wrong."""
    if status != "done":
        return status
    if check is None:
        return "unchecked"
    try:
        text = b"".join(vocab[t] for t in tokens).decode("utf-8")
    except (TypeError, UnicodeDecodeError) as e:
        return f"bad bytes: {e}"
    problem = check(schema, text)
    return "valid" if problem is None else f"INVALID: {problem}"


def p90(xs):
    return float(np.percentile(xs, 90))


def replay(vocab, matcher, ref, tokens, ref_masks):
    """Feed llguidance's walk (tokens, with its masks) to another engine's matcher and to a new
    llguidance matcher ref, comparing the engine's mask with llguidance's at each step.

    llguidance allows only the canonical tokens of text the grammar forces (after `{` of
    {"name": ..., `{"` but not `{`, and not `"n`): tokens allowed beside them that spell a prefix of
    the forced text are counted apart, and so are steps where the only other difference is DEL (0x7f)
    inside a string, which JSON allows raw and llguidance does not. Returns the steps compared, the
    counts of steps by kind, and the first differences of the other kinds."""
    bm = np.zeros((1, WORDS), np.int32)
    counts = {"equal": 0, "split": 0, "del": 0, "more": 0, "fewer": 0}
    delete = next(i for i, b in enumerate(vocab) if b == b"\x7f")
    shown = []

    def show(ids):
        return " ".join(repr(vocab[i].decode("utf-8", "replace")) if vocab[i] is not None else f"<{i}>"
                        for i in ids[:4]) + (" ..." if len(ids) > 4 else "")

    for step, ref_mask in enumerate(ref_masks):
        forced = ref.forced()
        bm.fill(0)
        matcher.fill(bm)
        a, b = unpack(ref_mask), unpack(bm)
        plus, minus = np.flatnonzero(b & ~a), np.flatnonzero(a & ~b)
        other = [t for t in plus if not (vocab[t] and len(vocab[t]) < len(forced) and forced.startswith(vocab[t]))]
        counts["equal"] += not (len(plus) or len(minus))
        counts["split"] += bool(len(plus)) and not other and not len(minus)
        counts["del"] += other == [delete] and not len(minus)
        other = [t for t in other if t != delete]
        counts["more"] += bool(other)
        counts["fewer"] += bool(len(minus))
        if len(shown) < 2 and (other or len(minus)):
            prefix = b"".join(vocab[t] for t in tokens[:step]).decode("utf-8", "replace")
            shown.append(f"step {step} after {prefix[-24:]!r}:" + (f" +{len(other)} {show(other)}" if other else "")
                         + (f" -{len(minus)} {show(minus)}" if len(minus) else ""))
        token = tokens[step] if step < len(tokens) else EOS
        if not b[token] or not matcher.advance(token):
            shown.append(f"refuses llguidance's token {step} ({vocab[token]!r})")
            break
        ref.advance(token)
    return step + 1, counts, shown


def sampler_context():
    """Median µs of refimpl's sampler on one row, and of applying a bitmask to a row with NumPy."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, V)
    params = SamplingParams(temperature=1.0, top_p=0.95)
    bm = np.random.default_rng(1).integers(-2**31, 2**31, (1, WORDS), dtype=np.int64).astype(np.int32)
    sample_ns, apply_ns = [], []
    for _ in range(200):
        row = logits.copy()
        t0 = time.perf_counter_ns()
        sample(row, params, rng)
        t1 = time.perf_counter_ns()
        row[~unpack(bm)] = -np.inf
        apply_ns.append(time.perf_counter_ns() - t1)
        sample_ns.append(t1 - t0)
    return statistics.median(sample_ns) / 1e3, statistics.median(apply_ns) / 1e3


# The schema refimpl decodes under in in_refimpl: short objects, so that most replies close themselves.
REFIMPL_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3}},
    "required": ["name", "age", "pets"], "additionalProperties": False}


def in_refimpl(model_dir, rounds, max_tokens=48):
    """ms per generated token with and without a grammar in refimpl's decoding, and the grammar step's
    µs per token; medians over alternated rounds."""
    from refimpl import grammar
    from refimpl.generate import generate, load

    model, tokenizer, stops = load(model_dir)
    compiled = grammar.Grammars(tokenizer, model.config.vocab_size, stops).json_schema(REFIMPL_SCHEMA)
    ids = tokenizer.encode_chat([{"role": "user", "content": "Describe a person and their pets as JSON."}])
    spent = []

    def timed(f):
        def call(*args):
            t0 = time.perf_counter_ns()
            result = f(*args)
            spent.append(time.perf_counter_ns() - t0)
            return result
        return call

    grammar.Matcher.allowed, grammar.Matcher.advance = timed(grammar.Matcher.allowed), timed(grammar.Matcher.advance)
    per_token = {False: [], True: []}
    step_us = []
    for r in range(rounds):
        for constrained in ((False, True) if r % 2 == 0 else (True, False)):
            params = SamplingParams(temperature=1.0, seed=r, max_tokens=max_tokens,
                                    grammar=compiled if constrained else None)
            times = []
            for _ in generate(model, tokenizer, ids, params, stops):
                times.append(time.perf_counter())
                if len(times) == 1:
                    spent.clear()  # decoding from here on: the prefill and the first token's step apart
            n = len(times) - 1
            per_token[constrained].append((times[-1] - times[0]) / n * 1e3)
            if constrained:
                step_us.append(sum(spent) / n / 1e3)
    med = statistics.median
    return med(per_token[False]), med(per_token[True]), med(step_us)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--walks", type=int, default=4, help="walks per engine and schema checked for validity")
    args = parser.parse_args()
    t_start = time.perf_counter()

    model_dir = pull()
    vocab = byte_vocab(model_dir)
    closers = np.array([EOS] + [i for i, b in enumerate(vocab) if b and set(b) <= set(b'"}]@:')])
    check = validator()
    if check is None:
        print("jsonschema not installed: the walks' validity is not checked (pip install jsonschema)")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}; default model's "
          f"vocabulary ({V} tokens), EOS {EOS}; compact JSON; walks of <= {MAX_STEPS} tokens; "
          f"median of {args.rounds} rounds, engine order rotated")

    engines, missing = [], []
    for cls in ENGINES:
        try:
            engine = cls(model_dir, vocab)
            engines.append(engine)
            print(f"{engine.name} {engine.version}: tokenizer setup {1e3 * engine.setup_s:.0f} ms")
        except ImportError as e:
            missing.append(cls.name)
            print(f"{cls.name}: not installed ({e})")
    if not engines:
        print("no grammar engine installed: pip install llguidance (xgrammar, outlines-core) to measure it")
        return

    fields = ("compile", "first", "mask", "p90", "adv", "tokens")
    results = {(e.name, s): {f: [] for f in fields} for e in engines for s, _ in SCHEMAS}  # lists over rounds
    errors, verdicts, texts, paths, compiled0, reused = {}, {}, {}, {}, {}, {}
    for r in range(args.rounds):
        order = engines[r % len(engines):] + engines[:r % len(engines)]
        for name, schema in SCHEMAS:
            for engine in order:
                key = (engine.name, name)
                if key in errors:
                    continue
                t0 = time.perf_counter()
                try:
                    compiled = reused.get(key) or engine.compile(schema)
                    matcher = engine.matcher_from(compiled)
                except Exception as e:  # each engine has its own exception types
                    errors[key] = f"{type(e).__name__}: {e}".replace("\n", " ")
                    continue
                compile_s = time.perf_counter() - t0
                if key in reused:
                    compile_s = results[key]["compile"][0] / 1e3
                elif compile_s > SLOW_COMPILE_S:
                    reused[key] = compiled
                tokens, status, mask_ns, adv_ns, masks = walk(matcher, 0, closers, record=(r == 0))
                for f, x in zip(fields, (compile_s * 1e3, mask_ns[0] / 1e3, statistics.median(mask_ns) / 1e3,
                                         p90(mask_ns) / 1e3, statistics.median(adv_ns) / 1e3 if adv_ns else math.nan,
                                         len(tokens) + (status == "done"))):
                    results[key][f].append(x)
                if r == 0:  # validity over more walks, untimed
                    compiled0[key], paths[key] = compiled, (tokens, masks)
                    texts[key] = b"".join(vocab[t] for t in tokens).decode("utf-8", "replace")
                    verdicts[key] = [verdict(vocab, schema, tokens, status, check)]
                    for seed in range(1, args.walks):
                        t, st, *_ = walk(engine.matcher_from(compiled), seed, closers)
                        verdicts[key].append(verdict(vocab, schema, t, st, check))
        print(f"round {r + 1} done at {time.perf_counter() - t_start:.0f} s")

    def state(key):
        if key in errors:
            return "NO"
        vs = verdicts[key]
        if any(v not in ("valid", "unfinished") for v in vs):
            return "INVALID"
        return "ok" if "valid" in vs or "unchecked" in vs else "unfinished"

    med = statistics.median
    print(f"\n{'schema':27} {'engine':14} {'compiled':8} {'compile ms':>10} {'1st mask µs':>11} {'mask µs':>7} "
          f"{'p90 µs':>7} {'adv µs':>6} {'tokens':>6}  walks valid")
    for name, _ in SCHEMAS:
        for engine in engines:
            key = (engine.name, name)
            if key in errors:
                print(f"{name:27} {engine.name:14} {'NO':8} {errors[key][:100]}")
                continue
            m = {f: med(xs) for f, xs in results[key].items()}
            vs = verdicts[key]
            note = f"{vs.count('valid')}/{len(vs)}"
            note += f", {vs.count('unfinished')} unfinished" if "unfinished" in vs else ""
            bad = [v for v in vs if v not in ("valid", "unfinished")]
            note += f", {len(bad)} INVALID: {bad[0].removeprefix('INVALID: ')[:70]}" if bad else ""
            print(f"{name:27} {engine.name:14} {'yes':8} {m['compile']:9.1f}{'*' if key in reused else ' '} "
                  f"{m['first']:11.0f} {m['mask']:7.1f} {m['p90']:7.1f} {m['adv']:6.1f} {m['tokens']:6.0f}  {note}")
    if reused:
        print(f"* over {SLOW_COMPILE_S:.0f} s: compiled in round 1 only")

    if errors:
        print("\ncompile errors:")
        for (e, name), msg in errors.items():
            print(f"  {e} / {name}: {msg[:300]}")
    bad = [k for k in verdicts if state(k) in ("INVALID", "unfinished")]
    if bad:
        print("\nwalk 0's text where some walk was invalid, or none finished:")
        for e, name in bad:
            wrong = [v for v in verdicts[(e, name)] if v not in ("valid", "unfinished")]
            print(f"  {e} / {name}: {texts[(e, name)][:110]!r}" + (f"\n      {wrong[0][:150]}" if wrong else ""))

    if engines[0].name == "llguidance" and len(engines) > 1:
        print("\nmasks beside llguidance's: llguidance's walk (round 1, seed 0) fed to each engine, masks compared "
              "at each step\n(split: the engine also allows a non-canonical split of the text the grammar "
              "forces, which llguidance leaves out; DEL: it also allows a raw DEL in a string, as JSON does)")
        for name, _ in SCHEMAS:
            for engine in engines[1:]:
                a, b = ("llguidance", name), (engine.name, name)
                if a in paths and b in paths:
                    tokens, masks = paths[a]
                    n, c, shown = replay(vocab, engine.matcher_from(compiled0[b]),
                                         engines[0].matcher_from(compiled0[a]), tokens, masks)
                    print(f"  {name:27} {engine.name:14} {n:3} steps: {c['equal']:3} equal, {c['split']:3} split, "
                          f"{c['del']:3} DEL, {c['more']:3} allow other tokens, {c['fewer']:3} allow fewer")
                    for line in shown:
                        print(f"      {line[:150]}")

    common = [name for name, _ in SCHEMAS if all((e.name, name) not in errors for e in engines)]
    print(f"\n{'engine':14} {'compiled':>8} {'ok':>5} {'invalid':>7} {'compile ms':>10} {'ratio':>7} "
          f"{'mask µs':>7} {'ratio':>7} {'p90 µs':>7} {'adv µs':>6}")
    per = {e.name: {f: [med(results[(e.name, s)][f]) for s in common] for f in fields} for e in engines}
    for engine in engines:
        states = [state((engine.name, s)) for s, _ in SCHEMAS]
        row = {f: med(per[engine.name][f]) if common else math.nan for f in ("compile", "mask", "p90", "adv")}
        ratios = {}
        for f in ("compile", "mask"):  # the median of the per-schema ratios
            ratios[f] = (f"{med(x / y for x, y in zip(per[engine.name][f], per['llguidance'][f])):6.2f}x"
                         if "llguidance" in per and common else "     -")
        print(f"{engine.name:14} {len(SCHEMAS) - states.count('NO'):5}/{len(SCHEMAS):<2} "
              f"{states.count('ok'):2}/{len(SCHEMAS):<2} {states.count('INVALID'):7} {row['compile']:10.1f} "
              f"{ratios['compile']:>7} {row['mask']:7.1f} {ratios['mask']:>7} {row['p90']:7.1f} {row['adv']:6.1f}")
    for name in missing:
        print(f"{name:14} not installed")
    print(f"(ok: some walk valid, none invalid. Costs: medians over the {len(common)} schemas every engine "
          "compiled; ratio: the median over them of engine / llguidance)")

    sample_us, apply_us = sampler_context()
    print(f"\nfor scale, per token: refimpl.sampling.sample (temperature 1, top_p 0.95, one [{V}] float64 row) "
          f"{sample_us:.0f} µs; applying a random half-allowed bitmask with NumPy (unpackbits, logits[~mask] = -inf) {apply_us:.0f} µs")
    if any(e.name == "llguidance" for e in engines):
        plain_ms, constrained_ms, step_us = in_refimpl(model_dir, args.rounds)
        print(f"\nin refimpl's decoding (default model, up to 48 tokens after the prompt, temperature 1, median of "
              f"{args.rounds} alternated rounds): {plain_ms:.1f} ms per token unconstrained, {constrained_ms:.1f} ms "
              f"under a JSON schema ({constrained_ms / plain_ms:.2f}x); the grammar step (mask + advance) "
              f"{step_us:.0f} µs per token, {step_us / 10 / constrained_ms:.1f}% of a token's time")
    print(f"total time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
