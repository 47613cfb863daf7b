"""Stop strings in TextStream: the incremental automaton against the definition (every prefix of
the text, bytes cut anywhere), overlapping stop strings, and work linear in the generated text
however much of it is held back.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.generate import TextStream


def by_definition(text, stops, final):
    """(released, stopped) for `text`, the text decoded so far, from the definition: the text up to
    where the first stop string to be complete begins (of two complete at the same character, the
    longer), and, unless it stopped or ended, less its longest tail that is a proper prefix of a stop
    string. Quadratic and plain: the reference that TextStream's automaton must agree with."""
    for end in range(1, len(text) + 1):
        complete = [len(s) for s in stops if text[:end].endswith(s)]
        if complete:
            return text[:end - max(complete)], True
    if final:
        return text, False
    held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - held], False


ALPHABET = "abé😀"  # few letters, so that stop strings overlap the text and each other; 2- and 4-byte ones


@settings(max_examples=1000, deadline=None)
@given(st.text(ALPHABET, max_size=40), st.lists(st.text(ALPHABET, min_size=1, max_size=5), max_size=4),
       st.lists(st.integers(0, 200), max_size=20))
def test_released_text_is_the_definition_after_every_token(text, stops, cuts):
    data = text.encode()
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})  # mid-character cuts too
    stream, released = TextStream(stops), ""
    for start, end in zip(bounds, bounds[1:]):
        released += stream.push(data[start:end])
        decoded = data[:end].decode(errors="ignore")  # valid UTF-8: drops only an unfinished character
        assert (released, stream.stopped) == by_definition(decoded, stops, final=False), f"after {decoded!r}"
    released += stream.finish()
    assert (released, stream.stopped) == by_definition(text, stops, final=True)
    if stream.stopped:
        assert stream.text == released


@pytest.mark.parametrize("pieces, expected", [
    ([b"abcd"], "a"), ([b"ab", b"cd"], "a"), ([b"a", b"b", b"c", b"d"], "a"), ([b"xabcd", b"e"], "xa"),
])
def test_the_stop_string_complete_first_wins(pieces, expected):
    """"bc" is complete before "abcd" is: the text ends before "bc", whatever the tokens (the old
    search cut before "abcd" when both arrived in one token). vLLM checks after each token, so it
    too cuts at the first stop string to appear; OpenAI does not say."""
    stream = TextStream(["abcd", "bc"])
    released = "".join(stream.push(piece) for piece in pieces) + stream.finish()
    assert stream.stopped and released == expected


def test_of_stop_strings_complete_at_once_the_longer_wins():
    stream = TextStream(["bc", "abc"])
    assert stream.push(b"xab") == "x" and stream.push(b"cd") == ""
    assert stream.stopped and stream.text == "x"


def test_a_replacement_character_at_finish_can_complete_a_stop_string():
    stream = TextStream(["x\ufffd"])
    assert stream.push(b"ax\xf0\x9f") == "a"  # "x" could begin the stop string; the emoji is unfinished
    assert stream.finish() == "" and stream.stopped  # the unfinished emoji became U+FFFD


def test_an_empty_stop_string_is_refused():
    with pytest.raises(ValueError):
        TextStream(["end", ""])


class Counted(list):
    """A list that counts its reads: the automaton's tables, to measure the work it does."""
    reads = 0

    def __getitem__(self, index):
        self.reads += 1
        return super().__getitem__(index)


LONG = 65_000  # characters in the stop string; the old hold-back check took minutes on it
TOKENS, TOKEN_CHARS = 2_000, 32  # 64,000 characters held back by the end


@pytest.mark.parametrize("stop, text, last, released", [
    ("ab" * (LONG // 2), "ab" * (TOKENS * TOKEN_CHARS // 2), "!", "ab" * (TOKENS * TOKEN_CHARS // 2) + "!"),
    # "!" falls back one character at a time through 64,000 states, all within one token
    ("a" * (LONG - 1) + "b", "a" * TOKENS * TOKEN_CHARS, "!", "a" * TOKENS * TOKEN_CHARS + "!"),
    # the text grows into the whole stop string and ends before it
    ("ab" * (LONG // 2), "ab" * (TOKENS * TOKEN_CHARS // 2), "ab" * ((LONG - TOKENS * TOKEN_CHARS) // 2), ""),
], ids=["mismatch", "long-fall-back", "complete"])
def test_work_is_linear_in_the_text_however_much_is_held_back(stop, text, last, released):
    """Each character costs O(1) automaton steps, amortized: the old check cost O(held^2) per token."""
    stream = TextStream([stop])
    goto, fail = stream.stops.goto, stream.stops.fail = Counted(stream.stops.goto), Counted(stream.stops.fail)
    pieces = [text[i:i + TOKEN_CHARS] for i in range(0, len(text), TOKEN_CHARS)]
    assert len(pieces) == TOKENS and "".join(stream.push(p.encode()) for p in pieces) == ""
    assert stream.stops.held == len(text)  # everything is held back: it all still begins the stop string
    assert stream.push(last.encode()) + stream.finish() == released
    characters = len(text) + len(last)
    # A step reads goto once and once more per failure link followed, which reads fail: no more fall-backs
    # than characters read in all, since each character deepens the state by one at most.
    assert goto.reads + fail.reads <= 4 * characters, f"{goto.reads + fail.reads} reads for {characters} characters"
