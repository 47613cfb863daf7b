"""Constrained decoding (refimpl/grammar.py) on tiny models and units: the sampler's grammar step,
the engine with grammars side by side, and how tool calls are read back (webapp/tools.py).

The tiny model is random, so what it writes under a grammar is gibberish; it must still match the
grammar exactly. Its schemas bound every value (enums, integers with a maximum, short arrays), so
that a choice reaches the grammar's end well within max_tokens.
"""

import json

import jsonschema
import numpy as np
import pytest

from refimpl.engine import Engine
from refimpl.explain import explain
from refimpl.generate import generate
from refimpl.grammar import GrammarError, Grammars
from refimpl.sampling import SamplingParams, sample
from webapp.tools import CallDeltas, held_back, split_calls

SCHEMA_A = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog", "emu"]},
                                             "count": {"type": "integer", "minimum": 0, "maximum": 999}},
            "required": ["kind", "count"], "additionalProperties": False}
SCHEMA_B = {"type": "object", "properties": {"flags": {"type": "array", "items": {"type": "boolean"},
                                                       "minItems": 1, "maxItems": 3},
                                             "level": {"enum": [1, 2, 3]}},
            "required": ["flags", "level"], "additionalProperties": False}
TOOLS = {"get_weather": {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}},
                         "required": ["unit"], "additionalProperties": False},
         "ping": {"type": "object", "properties": {}, "additionalProperties": False}}


@pytest.fixture(scope="module")
def grammars(tiny_chat_model):
    model, tokenizer, stop_ids = tiny_chat_model
    return Grammars(tokenizer, model.config.vocab_size, stop_ids)


def text_of(events):
    return "".join(e.text for e in events)


def prompt(tokenizer, i):
    return tokenizer.encode_chat([{"role": "user", "content": f"request {i}: answer in JSON " + "please " * i}])


# ---------------------------------------------------------------- the grammar on a byte-level vocabulary


def test_grammars_build_for_a_byte_level_vocabulary(tiny_chat_model, grammars):
    model, tokenizer, stop_ids = tiny_chat_model
    V = model.config.vocab_size
    matcher = grammars.json_schema({"enum": ["ab", "ba"]}).matcher()
    allowed = matcher.allowed(V)
    assert allowed.shape == (V,) and allowed.dtype == bool
    assert [tokenizer.token_bytes(t) for t in np.flatnonzero(allowed)] == [b'"']  # a JSON string opens with "
    assert not allowed[list(stop_ids)].any()  # the output cannot end before the grammar does
    for token in tokenizer.encode('"ab"'):
        matcher.advance(token)
    assert set(np.flatnonzero(matcher.allowed(V))) == set(stop_ids)  # the grammar's end: only end-of-sequence
    with pytest.raises(RuntimeError, match="refused"):
        grammars.json_schema({"enum": ["ab"]}).matcher().advance(tokenizer.encode("x")[0])


def test_uncompilable_schemas_raise_grammar_error(grammars):
    for schema in ({"type": "array", "uniqueItems": True},
                   {"if": {"type": "string"}, "then": {"maxLength": 2}, "else": {"type": "integer"}}):
        with pytest.raises(GrammarError):
            grammars.json_schema(schema)
    with pytest.raises(GrammarError):
        grammars.json_schema(["not", "a", "schema"])
    with pytest.raises(GrammarError):
        grammars.tool_calls({"f": {"type": "array", "uniqueItems": True}}, required=True, parallel=True)


def test_a_required_tool_call_grammar_starts_only_like_a_call(tiny_chat_model, grammars):
    model, tokenizer, _ = tiny_chat_model
    V = model.config.vocab_size
    required = grammars.tool_calls(TOOLS, required=True, parallel=False).matcher()
    assert [tokenizer.token_bytes(t) for t in np.flatnonzero(required.allowed(V))] == [b"<"]
    optional = grammars.tool_calls(TOOLS, required=False, parallel=False).matcher()
    assert optional.allowed(V).sum() > 100  # plain text may start almost any way
    for token in tokenizer.encode("<tool_call>"):  # ...but not like a call, unless it is one
        optional.advance(token)
    assert [tokenizer.token_bytes(t) for t in np.flatnonzero(optional.allowed(V))] == [b"\n"]


# ---------------------------------------------------------------- the sampler's grammar step


def test_forbidden_tokens_are_never_drawn():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50) * 3
    allowed = np.zeros(50, dtype=bool)
    allowed[[3, 17, 18, 40]] = True  # not the most likely tokens, mostly
    drawn = set()
    for seed in range(300):
        for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=1.5, top_k=3, top_p=0.9),
                       SamplingParams(temperature=0.7, min_p=0.05)):
            step = sample(logits.copy(), params, np.random.default_rng(seed), allowed=allowed)
            drawn.add(step.token)
            assert allowed[step.token]
            assert step.probs[~allowed].sum() == 0
    assert drawn <= {3, 17, 18, 40} and len(drawn) >= 3


def test_greedy_picks_the_best_allowed_token_and_leaves_the_logits_alone():
    logits = np.array([5.0, 1.0, 4.0, 3.0, 4.0, -2.0])
    before = logits.copy()
    allowed = np.array([False, True, False, True, False, True])
    step = sample(logits, SamplingParams(temperature=0), np.random.default_rng(0), allowed=allowed)
    assert step.token == 3
    np.testing.assert_array_equal(logits, before)  # the caller's row is not changed in place
    allowed[[2, 4]] = True
    assert sample(logits, SamplingParams(temperature=0), np.random.default_rng(0), allowed=allowed).token == 2  # tie: lower id


def test_removed_by_names_the_grammar():
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    allowed = np.array([False, True, True, True, True, True])
    params = SamplingParams(temperature=1.0, top_k=3)
    step = sample(np.log(probs), params, np.random.default_rng(0), allowed=allowed)
    assert step.token in (1, 2, 3)
    assert [step.removed_by(i) for i in range(6)] == ["grammar", None, None, None, "top_k", "top_k"]
    greedy = sample(np.log(probs), SamplingParams(temperature=0), np.random.default_rng(0), allowed=allowed)
    assert greedy.token == 1 and [greedy.removed_by(i) for i in range(3)] == ["grammar", None, "temperature"]
    # Without a grammar the most likely token is simply kept.
    assert sample(np.log(probs), params, np.random.default_rng(0)).removed_by(0) is None

    class ByteTokenizer:
        special_ids = set()

        def token_bytes(self, token_id):
            return bytes([65 + token_id])

    insight = explain(ByteTokenizer(), np.log(probs), step, params, count=6)
    by_id = {a.token_id: a for a in insight.alternatives}
    assert by_id[0].removed_by == "grammar" and not by_id[0].kept
    assert by_id[0].p == pytest.approx(0.4) and by_id[0].p_temp == 0  # the model's p, the sampler's 0
    assert by_id[5].removed_by == "top_k"
    assert insight.p == pytest.approx(probs[step.token])  # raw, not renormalised over what the grammar allowed


# ---------------------------------------------------------------- grammars under generate and the engine


def check(name, text):
    """A finished constrained output matches its grammar."""
    if name == "A":
        jsonschema.validate(json.loads(text), SCHEMA_A)
    elif name == "B":
        jsonschema.validate(json.loads(text), SCHEMA_B)
    elif name == "tools":
        content, calls = split_calls(text)
        assert content is None and len(calls) == 1, text
        function = calls[0]["function"]
        assert function["name"] in TOOLS
        jsonschema.validate(json.loads(function["arguments"]), TOOLS[function["name"]])


def test_grammars_side_by_side_in_the_engine_equal_each_alone(tiny_chat_model, grammars):
    model, tokenizer, stop_ids = tiny_chat_model
    kinds = {"A": grammars.json_schema(SCHEMA_A), "B": grammars.json_schema(SCHEMA_B),
             "tools": grammars.tool_calls(TOOLS, required=True, parallel=False), "none": None}
    jobs = [(name, prompt(tokenizer, i), SamplingParams(temperature=t, seed=11 + i, n=n, max_tokens=100, grammar=g))
            for i, ((name, g), t, n) in enumerate(zip(kinds.items(), (1.0, 0.8, 1.0, 1.0), (2, 2, 2, 1)))]

    def run(batch):
        engine = Engine(model, tokenizer, stop_ids, max_seqs=16, prefill_chunk=32, thread=False)
        requests = [engine.submit(ids, params) for _, ids, params in batch]
        while engine.running or engine.waiting:
            engine.run_step()
        return [list(r) for r in requests]

    together = run(jobs)
    alone = [run([job])[0] for job in jobs]
    for (name, _, params), events, single in zip(jobs, together, alone):
        assert [(e.index, e.token_id, e.text, e.finish_reason) for e in events] == \
               [(e.index, e.token_id, e.text, e.finish_reason) for e in single], name
        for index in range(params.n):
            mine = [e for e in events if e.index == index]
            if name != "none":
                assert mine[-1].finish_reason == "stop", (name, text_of(mine))
                check(name, text_of(mine))
    # The same requests through generate(), one at a time: the engine changes nothing.
    for (name, ids, params), events in zip(jobs, together):
        assert [e.token_id for e in generate(model, tokenizer, ids, params, stop_ids)] == [e.token_id for e in events]


def test_sampled_outputs_match_their_grammar_over_seeds(tiny_chat_model, grammars):
    model, tokenizer, stop_ids = tiny_chat_model
    ids = prompt(tokenizer, 1)
    outputs = {}
    for name, grammar in (("A", grammars.json_schema(SCHEMA_A)), ("B", grammars.json_schema(SCHEMA_B)),
                          ("tools", grammars.tool_calls(TOOLS, required=True, parallel=False))):
        params = SamplingParams(temperature=1.2, seed=5, n=6, max_tokens=100, grammar=grammar)
        events = list(generate(model, tokenizer, ids, params, stop_ids))
        for index in range(6):
            mine = [e for e in events if e.index == index]
            assert mine[-1].finish_reason == "stop"
            check(name, text_of(mine))
            outputs.setdefault(name, set()).add(text_of(mine))
    assert all(len(texts) >= 2 for texts in outputs.values()), outputs  # sampled, not one fixed answer


def test_parallel_tool_calls_grammar(tiny_chat_model, grammars):
    model, tokenizer, stop_ids = tiny_chat_model
    grammar = grammars.tool_calls(TOOLS, required=True, parallel=True)
    params = SamplingParams(temperature=1.0, seed=0, n=4, max_tokens=200, grammar=grammar)
    events = list(generate(model, tokenizer, prompt(tokenizer, 2), params, stop_ids))
    counts = []
    for index in range(4):
        mine = [e for e in events if e.index == index]
        assert mine[-1].finish_reason == "stop"
        assert "\n</tool_call>\n<tool_call>\n" in text_of(mine) or text_of(mine).count("<tool_call>") == 1
        content, calls = split_calls(text_of(mine))
        assert content is None and calls
        for call in calls:
            jsonschema.validate(json.loads(call["function"]["arguments"]), TOOLS[call["function"]["name"]])
        counts.append(len(calls))
    assert max(counts) >= 2, counts  # several calls in a row, one per line


def test_logprobs_stay_the_models_raw_distribution(tiny_chat_model, grammars):
    model, tokenizer, stop_ids = tiny_chat_model
    ids = prompt(tokenizer, 3)
    plain = next(iter(generate(model, tokenizer, ids, SamplingParams(temperature=0, max_tokens=1, logprobs=True,
                                                                     top_logprobs=5), stop_ids)))
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=True, top_logprobs=5,
                            grammar=grammars.json_schema(SCHEMA_A))
    constrained = next(iter(generate(model, tokenizer, ids, params, stop_ids)))
    assert tokenizer.token_bytes(constrained.token_id) == b"{"
    top = [(t.token_id, t.logprob) for t in constrained.logprobs.top]
    assert top == [(t.token_id, t.logprob) for t in plain.logprobs.top]
    raw = {t.token_id: t.logprob for t in plain.logprobs.top}
    if constrained.token_id in raw:
        assert constrained.logprobs.logprob == raw[constrained.token_id]
    assert constrained.logprobs.logprob <= top[0][1]


def test_an_output_cut_by_max_tokens_finishes_with_length(tiny_chat_model, grammars):
    model, tokenizer, stop_ids = tiny_chat_model
    for grammar in (grammars.json_object(), grammars.json_schema(SCHEMA_A),
                    grammars.tool_calls(TOOLS, required=True, parallel=True)):
        params = SamplingParams(temperature=1.0, seed=0, n=2, max_tokens=4, grammar=grammar)
        events = list(generate(model, tokenizer, prompt(tokenizer, 0), params, stop_ids))
        for index in range(2):
            mine = [e for e in events if e.index == index]
            assert len(mine) == 4 and mine[-1].finish_reason == "length"
            assert [e.finish_reason for e in mine[:-1]] == [None] * 3
            assert text_of(mine)[:1] in ("{", "<")


# ---------------------------------------------------------------- reading tool calls back


def call_text(name, arguments):
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


ONE = call_text("get_weather", '{"city": "Paris", "unit": "celsius"}')
# Arguments with nested objects, braces and the closing tag inside strings, escapes and non-ASCII text.
TRICKY = call_text("search", '{"q": "}</tool_call> \\"x\\" {", "nested": {"a": [1, {"b": "}"}]}, "note": "été\\n"}')
EMPTY = call_text("ping", "{}")
TWO = ONE + "\n" + TRICKY
THREE = EMPTY + "\n" + ONE + "\n" + EMPTY


def chunkings(text):
    """The same text cut several ways: all at once, char by char, token-like pieces, random cuts."""
    yield [text]
    yield list(text)
    for size in (2, 3, 5, 7, 13):
        yield [text[i:i + size] for i in range(0, len(text), size)]
    rng = np.random.default_rng(len(text))
    for _ in range(5):
        cuts = sorted(rng.choice(np.arange(1, len(text)), size=min(8, len(text) - 1), replace=False))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def stream(pieces):
    """Every delta CallDeltas releases for the pieces, then at finish."""
    deltas = CallDeltas()
    out = [d for piece in pieces for d in deltas.push(piece)]
    return out + deltas.finish()


def merged(deltas):
    """The deltas merged as the openai client merges them: content concatenated; tool calls by
    index, id, type and name from their first delta, arguments concatenated."""
    content, calls = None, {}
    for delta in deltas:
        assert set(delta) <= {"content", "tool_calls"}
        if "content" in delta:
            content = (content or "") + delta["content"]
        for call in delta.get("tool_calls", []):
            entry = calls.setdefault(call["index"], {"id": None, "type": None, "name": None, "arguments": ""})
            entry["id"] = entry["id"] or call.get("id")
            entry["type"] = entry["type"] or call.get("type")
            function = call.get("function", {})
            entry["name"] = entry["name"] or function.get("name")
            entry["arguments"] += function.get("arguments", "")
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("text", [ONE, TRICKY, EMPTY, TWO, THREE], ids=["one", "tricky", "empty", "two", "three"])
def test_streamed_calls_equal_the_calls_read_from_the_whole_text(text):
    content, expected = split_calls(text)
    assert content is None
    for pieces in chunkings(text):
        deltas = stream(pieces)
        got_content, calls = merged(deltas)
        assert got_content is None
        assert [c["name"] for c in calls] == [c["function"]["name"] for c in expected]
        assert [json.loads(c["arguments"]) for c in calls] == [json.loads(c["function"]["arguments"]) for c in expected]
        assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
        assert len({c["id"] for c in calls}) == len(calls)
        # A call's first delta names it (index, id, type, name, arguments ""); later ones carry only fragments.
        seen = set()
        for delta in deltas:
            (call,) = delta["tool_calls"]
            if call["index"] not in seen:
                seen.add(call["index"])
                assert call["index"] == len(seen) - 1  # calls come in order
                assert set(call) == {"index", "id", "type", "function"} and call["function"]["arguments"] == ""
            else:
                assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
                assert call["function"]["arguments"]  # no empty fragments


def test_a_calls_arguments_stream_as_the_model_writes_them():
    """Fragments go out as they come: only what may still become the call's end is held."""
    deltas = CallDeltas()
    head = '<tool_call>\n{"name": "get_weather", "arguments": '
    (first,) = deltas.push(head)
    assert first["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert deltas.push('{"city": "Par') == [{"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Par'}}]}]
    assert deltas.push('is"}') == [{"tool_calls": [{"index": 0, "function": {"arguments": 'is"'}}]}]  # "}" held
    # Two closing braces: the first can no longer be the call's end, the second can.
    assert deltas.push("}\n</tool") == [{"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]}]
    assert deltas.push("_call>") == []
    assert deltas.finish() == []


def test_plain_content_passes_through_unchanged():
    for text in ("Hello there.", "<b>hi</b> and <tool_call> later", "<", "<tool", "<tool_call", "a\n<tool_call>\n"):
        for pieces in chunkings(text) if len(text) > 1 else [[text]]:
            deltas = stream(pieces)
            assert merged(deltas) == (text, []), (text, pieces)
            assert all("tool_calls" not in d for d in deltas)
    # Text that begins like a call is held until it cannot be one, then released whole.
    deltas = CallDeltas()
    assert deltas.push("<") == [] and deltas.push("too") == []
    assert deltas.push("ls") == [{"content": "<tools"}]
    assert deltas.push(" x") == [{"content": " x"}]
    assert deltas.finish() == []
    deltas = CallDeltas()
    assert deltas.push("<tool_c") == [] and deltas.finish() == [{"content": "<tool_c"}]  # released at the end


def test_held_back():
    end = CallDeltas.END
    assert end == "}\n</tool_call>"
    assert held_back("abc", end) == 0
    assert held_back('{"a": 1}', end) == 1
    assert held_back('{"a": {}}', end) == 1  # "}}" is not a start of the end, only its last "}"
    assert held_back('{"a": 1}\n</tool', end) == len("}\n</tool")
    assert held_back("x}\n</tool_call", end) == len(end) - 1  # all but the last character
    assert held_back("", end) == 0


def test_split_calls():
    content, calls = split_calls(ONE)
    assert content is None and len(calls) == 1
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}
    content, calls = split_calls(TWO)
    assert content is None and [c["function"]["name"] for c in calls] == ["get_weather", "search"]
    assert json.loads(calls[1]["function"]["arguments"])["q"] == '}</tool_call> "x" {'
    assert calls[0]["id"] != calls[1]["id"]
    assert split_calls("No calls here.") == ("No calls here.", None)
    assert split_calls("") == ("", None)
    malformed = "<tool_call>\n{not json}\n</tool_call>"
    assert split_calls(malformed) == (malformed, None)
    missing = '<tool_call>\n{"name": "f"}\n</tool_call>'
    assert split_calls(missing) == (missing, None)
    # A reply the grammar could not have written stays text, as a stream (CallDeltas) would send it.
    assert split_calls(malformed + "\n" + ONE) == (malformed + "\n" + ONE, None)
    assert split_calls("Let me check.\n" + ONE) == ("Let me check.\n" + ONE, None)
    # A call cut by max_tokens: kept with the arguments so far once its name is complete, as streamed.
    content, calls = split_calls(ONE + "\n" + ONE[:ONE.index('"arguments"') + 20])
    assert content is None and len(calls) == 2 and calls[1]["function"]["arguments"] == ONE[
        ONE.index('"arguments"') + len('"arguments": '):ONE.index('"arguments"') + 20]
    cut = ONE + "\n" + ONE[:20]  # the second call's name not yet written: nothing of it is a call
    assert split_calls(cut)[1] is not None and len(split_calls(cut)[1]) == 1


def accepts(grammar, tokenizer, vocab_size, text):
    """Whether the grammar lets the tokens of text be written, in full, and end there."""
    matcher = grammar.matcher()
    for token in tokenizer.encode(text):
        if not matcher.allowed(vocab_size)[token]:
            return False
        matcher.advance(token)
    return True


def test_text_under_tool_choice_auto_is_never_an_unchecked_call(tiny_chat_model, grammars):
    """Plain text under "auto" may not hold a call anywhere (only a checked call is one)."""
    model, tokenizer, _ = tiny_chat_model
    auto = grammars.tool_calls(TOOLS, required=False, parallel=True)
    text = 'Let me check.\n<tool_call>\n{"name": "rm_rf", "arguments": 5}\n</tool_call>'
    assert not accepts(auto, tokenizer, model.config.vocab_size, text)
    assert accepts(auto, tokenizer, model.config.vocab_size, "Let me check: <tool> is not a call.")
    assert merged(stream([text])) == (text, [])
    assert split_calls(text) == (text, None)  # the same as streamed: content, not a call to a tool not offered
