"""Generation: streamed text (UTF-8 and stop strings), events against the golden greedy
continuation, n choices, finish reasons, the context limit, usage, prompt log-probabilities,
and the `refimpl score` and `refimpl chat` commands.

Golden data: golden/smollm2-135m-instruct.json, made by golden/make_golden_logprobs.py;
regenerate it with `make golden`, never by hand.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.cli import main
from refimpl.generate import ContextLengthExceeded, TextStream, generate, prompt_logprobs
from refimpl.models import load_model
from refimpl.sampling import SamplingParams
from refimpl.tokenizer import Tokenizer

from conftest import load_golden

TOLERANCE = 1e-4  # max |Δ logprob| against transformers, as in test_model_golden.py
REPLACEMENT = "\ufffd"


# ---------------------------------------------------------------- TextStream, no model

def stream(pieces, stop=(), finish=True):
    """Feed byte pieces; return the stream and every delta (the one from finish() last)."""
    text = TextStream(stop)
    deltas = [text.push(piece) for piece in pieces]
    if finish:
        deltas.append(text.finish())
    return text, deltas


def assert_never_taken_back(deltas, final):
    """Every delta extends the released text, which is always a prefix of the final text."""
    released = ""
    for delta in deltas:
        released += delta
        assert final.startswith(released), f"released {released!r}, but the text is {final!r}"
    assert released == final


@pytest.mark.parametrize("pieces", [
    [b"Hello ", b"STOP", b" world"],  # the stop string is one token
    [b"Hello ", b"STOP world"],  # one token, followed by more text in it
    [b"Hello ST", b"OP world"],  # two tokens
    [b"Hello S", b"T", b"OP world"],  # three tokens
    [b"Hello S", b"TO", b"P"],  # three tokens, nothing after it
], ids=["1-token", "1-token-with-tail", "2-tokens", "3-tokens", "3-tokens-at-end"])
def test_stop_string_split_over_tokens(pieces):
    text, deltas = stream(pieces, stop=["STOP"])
    assert text.stopped
    assert_never_taken_back(deltas, "Hello ")
    assert "S" not in "".join(deltas)  # nothing of the stop string leaves, even for a moment


def test_text_after_a_stop_string_is_never_released():
    text, deltas = stream([b"ab", b"STOP\xf0\x9f"], stop=["STOP"], finish=False)
    assert text.push(b"\x98\x80 more") == ""
    assert text.finish() == ""  # the half emoji after the stop is not turned into U+FFFD
    assert "".join(deltas) == "ab"


def test_held_back_prefix_is_released_when_it_stops_matching():
    text = TextStream(["STOP"])
    assert text.push(b"Hello ST") == "Hello "  # "ST" could begin "STOP"
    assert text.push(b"O") == ""  # "STO" still could
    assert text.push(b"RM") == "STORM"  # now it cannot
    assert not text.stopped


def test_held_back_prefix_is_released_at_finish():
    text = TextStream(["STOP", "\n\n"])
    assert text.push(b"Hello ST") == "Hello "
    assert text.push(b"\n") == "ST"  # "ST" is no longer a tail; "\n" could begin "\n\n"
    assert text.finish() == "\n"
    assert not text.stopped


def test_the_earliest_stop_string_wins():
    text, deltas = stream([b"one two three"], stop=["three", "two"])
    assert "".join(deltas) == "one " and text.stopped


@pytest.mark.parametrize("pieces, expected", [
    ([b"\xf0", b"\x9f", b"\x98", b"\x80"], "😀"),  # a 4-byte emoji over four tokens
    ([b"caf\xc3", b"\xa9!"], "café!"),  # an accented letter over two
    ([b"\xf0\x9f\x8c", b"\x88\xf0\x9f", b"\x8c\x88"], "🌈🌈"),
    ([b"na\xc3", b"\xafve \xf0\x9f\x91", b"\x8d\xf0\x9f\x8f\xbd"], "naïve 👍🏽"),
])
def test_characters_split_across_tokens(pieces, expected):
    _, deltas = stream(pieces)
    assert not any(REPLACEMENT in d for d in deltas)
    assert_never_taken_back(deltas, expected)


def test_an_incomplete_character_at_finish_becomes_one_replacement_character():
    _, deltas = stream([b"ok \xf0\x9f"])
    assert deltas == ["ok ", REPLACEMENT]


ALPHABET = "ab é😀\n"


@settings(max_examples=500, deadline=None)
@given(st.text(ALPHABET, max_size=30), st.lists(st.text(ALPHABET, min_size=1, max_size=3), max_size=3),
       st.lists(st.integers(0, 200), max_size=12))
def test_stream_properties(text, stops, cuts):
    """Any text, any stop strings, bytes cut anywhere (mid-character too)."""
    data = text.encode()
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    pieces = [data[a:b] for a, b in zip(bounds, bounds[1:])]
    stream_, deltas = stream(pieces, stop=stops)
    released = "".join(deltas)
    assert not any(REPLACEMENT in d for d in deltas)
    assert_never_taken_back(deltas, released)
    assert text.startswith(released)
    assert not any(s in released for s in stops)  # no stop string ever leaves
    if stream_.stopped:  # the text ends right where a stop string begins
        assert any(text[len(released):].startswith(s) for s in stops)
    else:
        assert released == text and not any(s in text for s in stops)
    if len(stops) == 1 and stops[0] in text:  # with one stop string the cut is exact
        assert released == text[:text.index(stops[0])]


# ---------------------------------------------------------------- the default model

@pytest.fixture(scope="module")
def golden():
    return {case["name"]: case for case in load_golden("smollm2-135m-instruct.json")["cases"]}


@pytest.fixture(scope="module")
def lm(default_model_dir):
    """The default model, its tokenizer and its end-of-sequence ids, loaded once for the module."""
    from refimpl.generate import default_stop_ids

    model, tokenizer = load_model(default_model_dir), Tokenizer.from_dir(default_model_dir)
    return model, tokenizer, default_stop_ids(tokenizer, model.config, default_model_dir)


def run(lm, ids, stop_ids=(), **params):
    """Generate to the end; return the Generation (for usage) and its events."""
    model, tokenizer, _ = lm
    generation = generate(model, tokenizer, ids, SamplingParams(**params), stop_ids)
    return generation, list(generation)


def tokens(events, index=0):
    return [e.token_id for e in events if e.index == index]


def text(events, index=0):
    return "".join(e.text for e in events if e.index == index)


def assert_text_is_the_decoded_tokens(lm, events, stop_ids=()):
    """The streamed text is the decoded tokens, without the stop token and special tokens."""
    tokenizer = lm[1]
    for index in {e.index for e in events}:
        ids = [t for t in tokens(events, index) if t not in stop_ids]
        assert text(events, index) == tokenizer.decode(ids, skip_special_tokens=True)


def assert_close(ours, theirs, what):
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    diff = np.abs(ours - theirs)
    assert diff.max(initial=0) <= TOLERANCE, (
        f"{what}: max |Δ logprob| = {diff.max():.3g} > {TOLERANCE} at index {int(diff.argmax())}; "
        "if transformers' output legitimately changed, regenerate with `make golden`")


GREEDY_STEPS = 8


@pytest.mark.parametrize("name, steps", [("raw_english", GREEDY_STEPS), ("raw_unicode", 9)])
def test_greedy_generation_matches_golden(lm, golden, name, steps):
    """raw_unicode's continuation is 🌈 after 🌈, each one 2-, 1- and 1-byte tokens: partial characters."""
    case = golden[name]
    generation, events = run(lm, case["input_ids"], temperature=0, max_tokens=steps, logprobs=True, top_logprobs=5)
    assert tokens(events) == case["greedy_ids"][:steps]
    assert_close([e.logprobs.logprob for e in events], case["greedy_logprobs"][:steps], f"{name} logprobs")
    # The first step's top tokens are transformers' top tokens after the whole prompt.
    first = events[0].logprobs.top
    assert first[0].token_id == events[0].token_id
    assert_close([t.logprob for t in first], case["top_logprobs"][-1][:5], f"{name} top logprobs")
    streamed = text(events)
    assert not any(REPLACEMENT in e.text for e in events)  # no delta holds part of a character
    assert any(e.text == "" for e in events) == (name == "raw_unicode")  # a part waits for the rest
    assert b"".join(bytes(e.logprobs.bytes) for e in events) == streamed.encode()
    assert_text_is_the_decoded_tokens(lm, events)
    assert [e.finish_reason for e in events] == [None] * (steps - 1) + ["length"]
    assert generation.usage.completion_tokens == steps


def test_greedy_chat_stops_at_end_of_sequence(lm, golden):
    """chat_multi_turn's greedy reply ends with <|im_end|> (the EOS) after 13 tokens."""
    case = golden["chat_multi_turn"]
    stop_ids = lm[2]
    end = next(i for i, t in enumerate(case["greedy_ids"]) if t in stop_ids)
    generation, events = run(lm, case["input_ids"], stop_ids=stop_ids, temperature=0, max_tokens=32)
    assert tokens(events) == case["greedy_ids"][:end + 1]
    assert events[-1].finish_reason == "stop" and events[-1].token_id in stop_ids
    assert text(events) == lm[1].decode(case["greedy_ids"][:end], skip_special_tokens=True)
    assert_text_is_the_decoded_tokens(lm, events, stop_ids)
    usage = generation.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(case["input_ids"]), end + 1)
    assert usage.prompt_tokens_per_second > 0 and usage.completion_tokens_per_second > 0
    assert usage.tokens_per_second > 0


def stop_string_over(pieces, first, count):
    """A stop string that starts inside token `first` and ends inside token first + count - 1."""
    if count == 1:
        return pieces[first].strip()
    return pieces[first][-2:] + "".join(pieces[first + 1:first + count - 1]) + pieces[first + count - 1][:2]


@pytest.mark.parametrize("count", [1, 2, 3])
def test_stop_string_over_generated_tokens(lm, golden, count):
    """raw_english's greedy continuation: ' it finds a rabbit. The fox is ...'."""
    case = golden["raw_english"]
    pieces = [lm[1].decode([t]) for t in case["greedy_ids"][:GREEDY_STEPS]]
    stop = stop_string_over(pieces, 3, count)
    whole = "".join(pieces)
    _, events = run(lm, case["input_ids"], temperature=0, max_tokens=GREEDY_STEPS, stop=["zzz", stop])
    assert text(events) == whole[:whole.index(stop)]
    assert events[-1].finish_reason == "stop"
    assert len(events) == 3 + count  # it stops at the token that completes the stop string
    assert tokens(events) == case["greedy_ids"][:3 + count]


def test_stop_token_id(lm, golden):
    case = golden["raw_english"]
    stop_id = case["greedy_ids"][4]
    _, events = run(lm, case["input_ids"], temperature=0, max_tokens=GREEDY_STEPS, stop_token_ids=[stop_id])
    assert tokens(events) == case["greedy_ids"][:5]
    assert events[-1].finish_reason == "stop"
    assert text(events) == lm[1].decode(case["greedy_ids"][:4])  # the stop token is not text
    assert_text_is_the_decoded_tokens(lm, events, {stop_id})


def test_n_choices_are_seeded_and_differ(lm, golden):
    ids = golden["raw_english"]["input_ids"]
    params = dict(temperature=1.0, seed=1234, n=3, max_tokens=4)
    _, first = run(lm, ids, **params)
    _, again = run(lm, ids, **params)
    choices = [tokens(first, i) for i in range(3)]
    assert all(len(c) == 4 for c in choices)
    assert choices == [tokens(again, i) for i in range(3)]  # each choice is reproducible
    assert len({tuple(c) for c in choices}) > 1  # and they are not all the same
    assert_text_is_the_decoded_tokens(lm, first)
    _, other_seed = run(lm, ids, **params | {"seed": 99})
    assert [tokens(other_seed, i) for i in range(3)] != choices


# ---------------------------------------------------------------- the context window

CONTEXT = 16


@pytest.fixture(scope="module")
def short_context(tiny_chat_model_dir, tmp_path_factory):
    """A copy of a tiny model whose config.json allows only CONTEXT positions."""
    path = tmp_path_factory.mktemp("short-context")
    for f in Path(tiny_chat_model_dir).iterdir():
        shutil.copy(f, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"max_position_embeddings": CONTEXT}))
    model = load_model(path)
    assert model.config.max_position_embeddings == CONTEXT
    return model, Tokenizer.from_dir(path), ()


@pytest.mark.parametrize("length", [CONTEXT, CONTEXT + 4])
def test_prompt_that_does_not_fit(short_context, length):
    model, tokenizer, _ = short_context
    with pytest.raises(ContextLengthExceeded) as error:
        generate(model, tokenizer, list(range(1, length + 1)), SamplingParams())
    assert str(CONTEXT) in str(error.value) and str(length) in str(error.value)
    assert (error.value.prompt_tokens, error.value.context_length) == (length, CONTEXT)


@pytest.mark.parametrize("prompt_length, max_tokens", [(CONTEXT - 1, 50), (10, 50), (10, None)])
def test_max_tokens_is_capped_at_the_context_end(short_context, prompt_length, max_tokens):
    generation, events = run(short_context, list(range(1, prompt_length + 1)), temperature=0, max_tokens=max_tokens)
    assert len(events) == CONTEXT - prompt_length
    assert events[-1].finish_reason == "length"
    assert generation.usage.completion_tokens == CONTEXT - prompt_length


# ---------------------------------------------------------------- prompt log-probabilities

@pytest.mark.parametrize("name", ["raw_english", "chat_with_system"])
def test_prompt_logprobs_match_golden(lm, golden, name):
    case = golden[name]
    entries = prompt_logprobs(lm[0], lm[1], case["input_ids"], top=5)
    assert entries[0] is None
    assert [e.token_id for e in entries[1:]] == case["input_ids"][1:]
    assert_close([e.logprob for e in entries[1:]], case["token_logprobs"][1:], f"{name} prompt logprobs")
    assert_close([[t.logprob for t in e.top] for e in entries[1:]],
                 [row[:5] for row in case["top_logprobs"][:-1]], f"{name} prompt top logprobs")


def parse_score(out):
    """`refimpl score` lines: fixed-width position, token id and logprob columns; then the total."""
    lines = out.strip().splitlines()
    assert lines[0].split() == ["pos", "token", "id", "logprob", "token"]
    rows = [(int(line[:5]), int(line[6:14]), line[16:26].strip()) for line in lines[1:-1]]
    assert lines[-1].startswith("total log-probability of tokens")
    return rows, float(lines[-1].rsplit(":", 1)[1])


PRINTED = 5e-5  # the command prints logprobs with 4 decimals


def test_score_command(golden, default_model_dir, capsys):
    case = golden["raw_english"]
    assert main(["score", case["text"], "--model", str(default_model_dir)]) == 0
    rows, total = parse_score(capsys.readouterr().out)
    assert [r[0] for r in rows] == list(range(len(case["input_ids"])))
    assert [r[1] for r in rows] == case["input_ids"]
    assert rows[0][2] == ""  # the first token has no prefix to be scored against
    diff = np.abs(np.array([float(r[2]) for r in rows[1:]]) - case["token_logprobs"][1:])
    assert diff.max() <= TOLERANCE + PRINTED, f"max |Δ logprob| {diff.max():.3g}"
    assert abs(total - sum(case["token_logprobs"][1:])) <= 1e-3


def test_score_chat_command(golden, default_model_dir, tmp_path, capsys):
    """`score --chat` scores the conversation as written (no generation prompt), while the golden
    input_ids were rendered with add_generation_prompt=True: the command's ids are the golden ids
    without the trailing '<|im_start|>assistant\\n', and a causal model scores a prefix the same."""
    case = golden["chat_with_system"]
    messages = tmp_path / "messages.json"
    messages.write_text(json.dumps(case["messages"]))
    assert main(["score", "--chat", str(messages), "--model", str(default_model_dir)]) == 0
    rows, total = parse_score(capsys.readouterr().out)
    n = len(rows)
    assert [r[1] for r in rows] == case["input_ids"][:n]
    tokenizer = Tokenizer.from_dir(default_model_dir)
    assert tokenizer.decode(case["input_ids"][n:]) == "<|im_start|>assistant\n"
    diff = np.abs(np.array([float(r[2]) for r in rows[1:]]) - case["token_logprobs"][1:n])
    assert diff.max() <= TOLERANCE + PRINTED, f"max |Δ logprob| {diff.max():.3g}"
    assert abs(total - sum(case["token_logprobs"][1:n])) <= 1e-3


def test_chat_command_in_a_terminal(default_model_dir):
    """Two replies, /new between them, then end of input: exit status 0."""
    done = subprocess.run(
        [sys.executable, "-m", "refimpl", "chat", "--model", str(default_model_dir), "--max-tokens", "8",
         "--temperature", "0"],
        input="Hello\n/new\nHi\n", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    replies = [part.split("\n", 1)[0] for part in done.stdout.split("model> ")[1:]]
    assert len(replies) == 2 and all(r.strip() for r in replies), done.stdout
