"""Generation: from prompt token ids to a stream of events, one per generated token and choice.

Prefill runs the whole prompt through the model once; n > 1 choices then copy that KV cache
instead of recomputing it, and every decode step feeds all unfinished choices through the
model together (one batched forward pass). Each choice samples with its own seeded generator.

Text leaves here as deltas that never have to be taken back:
- A token can hold part of a UTF-8 character (an emoji is often 2-4 tokens), so token bytes go
  through an incremental UTF-8 decoder, which releases a character only when it is complete.
- A stop string can be spread over several tokens, so any tail of the text that could still
  grow into a stop string is held back until it either becomes one (the text ends before it)
  or cannot any more.

finish_reason is "stop" (end-of-sequence token, stop token or stop string) or "length"
(max_tokens, or the end of the context window). A stop token is not part of the text, but its
event carries its log-probabilities like any token's (a scorer needs to know it was generated).
"""

import codecs
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refimpl.explain import explain, most_likely, token_text
from refimpl.models import forward, load_model
from refimpl.sampling import log_softmax, sample
from refimpl.tokenizer import Tokenizer
from refimpl.xp import namespace, to_numpy

HOST = namespace("cpu")  # log-probabilities reported to users are computed on the host


class ContextLengthExceeded(ValueError):
    """The prompt leaves no room for a single new token in the context window."""

    def __init__(self, prompt_tokens, context_length):
        super().__init__(f"this model's context window is {context_length} tokens, but the prompt has "
                         f"{prompt_tokens} tokens, leaving no room for a completion")
        self.prompt_tokens, self.context_length = prompt_tokens, context_length


@dataclass
class TopLogprob:
    token_id: int
    token: str
    bytes: list
    logprob: float


@dataclass
class TokenLogprobs:
    token_id: int
    token: str  # the token's own text; U+FFFD where it holds only part of a character
    bytes: list  # its exact UTF-8 bytes
    logprob: float
    top: list  # TopLogprob, most likely first


@dataclass
class Event:
    index: int  # which choice
    token_id: int | None
    text: str  # the text this step releases (may be empty while a character or stop string is pending)
    logprobs: TokenLogprobs | None = None
    finish_reason: str | None = None
    offset: int = 0  # where the token starts in the choice's text, in characters (code points)
    insight: object = None  # explain.TokenInsight when params.explain asks for one
    stop_token: bool = False  # the token is an end-of-sequence or stop token: it ends the choice, adds no text


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    prompt_seconds: float = 0.0
    completion_seconds: float = 0.0

    @property
    def prompt_tokens_per_second(self):
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def completion_tokens_per_second(self):
        return self.completion_tokens / self.completion_seconds if self.completion_seconds else 0.0

    @property
    def tokens_per_second(self):
        seconds = self.prompt_seconds + self.completion_seconds
        return (self.prompt_tokens + self.completion_tokens) / seconds if seconds else 0.0


class StopStrings:
    """An Aho-Corasick automaton over the stop strings, read one character at a time. Its states
    are the prefixes of stop strings (the nodes of their trie); after each character the state is
    the longest suffix of the text that is such a prefix, so its depth is the text to hold back.
    A mismatch falls back along failure links (to the next shorter such suffix): as each character
    deepens the state by one at most, the fall-backs cost O(1) per character over the whole text."""

    # By hand, not pyahocorasick: it reports matches but not the depth of its state, which is what
    # says how much to hold back; and a C dependency is not worth thirty readable lines.
    def __init__(self, stops):
        if "" in stops:
            raise ValueError("an empty stop string would end the text before it begins")
        self.goto, self.fail, self.depth, self.ends = [{}], [0], [0], [0]  # node 0, the root: ""
        for s in stops:  # the trie: one node per distinct prefix
            node = 0
            for ch in s:
                if ch not in self.goto[node]:
                    self.goto[node][ch] = len(self.goto)
                    self.goto.append({})
                    self.fail.append(0)
                    self.depth.append(self.depth[node] + 1)
                    self.ends.append(0)
                node = self.goto[node][ch]
            self.ends[node] = len(s)
        # Failure links breadth first: a node's link is shallower, so it is complete before the node's.
        # ends[node]: the longest stop string that is a suffix of the node's prefix (0: none).
        order = list(self.goto[0].values())  # depth 1: they fall back to the root
        for node in order:
            for ch, child in self.goto[node].items():
                self.fail[child] = self.step(self.fail[node], ch)
                self.ends[child] = self.ends[child] or self.ends[self.fail[child]]
                order.append(child)
        self.state = 0

    def step(self, node, ch):
        while node and ch not in self.goto[node]:
            node = self.fail[node]
        return self.goto[node].get(ch, 0)

    def read(self, ch):
        """Read one character; return the length of the longest stop string it ends (0: none)."""
        self.state = self.step(self.state, ch)
        return self.ends[self.state]

    @property
    def held(self):
        """Length of the longest tail of the text read that begins some stop string."""
        return self.depth[self.state]


class TextStream:
    """Token bytes in, text deltas out: no partial characters, nothing that belongs to a stop string.

    Where stop strings overlap, the text is cut at the one that is complete first, as if the text
    grew one character at a time (vLLM too cuts at the first stop string to appear as tokens
    arrive); of those that end at the same character, at the longest, which begins first. So with
    stop strings "abcd" and "bc", "abcd" ends the text after "a", however it is split into tokens.
    """

    def __init__(self, stop_strings=()):
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop_strings = list(stop_strings)
        self.stops = StopStrings(self.stop_strings)
        self.text = ""  # everything decoded so far (cut at a stop string once found)
        self.sent = 0  # how much of text has been released
        self.stopped = False

    def push(self, token_bytes):
        """Add one token's bytes; return the text that can be released now."""
        if self.stopped:  # the text ended at a stop string: nothing after it is ever released
            return ""
        return self._release(self.utf8.decode(token_bytes), final=False)

    def finish(self):
        """The generation ended: release what was held back (an incomplete character becomes U+FFFD)."""
        if self.stopped:  # bytes of a half-decoded character after the stop string are not text
            return ""
        return self._release(self.utf8.decode(b"", final=True), final=True)

    def _release(self, new, final):
        # Each new character goes through the automaton once: the work per token is its length, not
        # the length of the held-back text. A stop string found now began in the held-back tail (its
        # first characters were held as the start of a stop string), so the cut takes nothing back.
        start = len(self.text)
        self.text += new
        for i, ch in enumerate(new):
            found = self.stops.read(ch)
            if found:  # a stop string ends at this character: the text ends where it begins
                self.text, self.stopped, final = self.text[:start + i + 1 - found], True, True
                break
        if final:  # everything is released: no stop string can begin in the text so far any more
            self.stops.state = 0
        end = len(self.text) if final else len(self.text) - self.stops.held
        delta, self.sent = self.text[self.sent:end], max(self.sent, end)
        return delta


def top_logprobs(tokenizer, logprobs, count):
    """The `count` most likely tokens of a log-probability row [V], ties to the lower id."""
    return [TopLogprob(i, *token_text(tokenizer, i), float(logprobs[i])) for i in most_likely(logprobs, count)]


def token_logprobs(tokenizer, logprobs, token_id, count):
    return TokenLogprobs(token_id, *token_text(tokenizer, token_id), float(logprobs[token_id]),
                         top_logprobs(tokenizer, logprobs, count))


@dataclass
class Choice:
    rng: np.random.Generator
    cache: object
    text: TextStream
    generated: list = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    finished: bool = False
    grammar: object = None  # this choice's grammar.Matcher, when the request has a grammar


class Generation:
    """Iterate to receive Events; `usage` is complete once the iteration ends."""

    def __init__(self, model, tokenizer, prompt_ids, params, stop_ids):
        params.validate(model.config.vocab_size)
        context = model.config.max_position_embeddings
        if not prompt_ids:
            raise ValueError("the prompt is empty: at least one token is needed to predict the next")
        if len(prompt_ids) + 1 > context:
            raise ContextLengthExceeded(len(prompt_ids), context)
        room = context - len(prompt_ids)
        self.max_new = min(params.max_tokens or room, room)  # capped at the context end: finish "length"
        self.model, self.tokenizer, self.prompt_ids, self.params = model, tokenizer, list(prompt_ids), params
        self.stop_ids = set(stop_ids) | set(params.stop_token_ids)
        self.usage = Usage(prompt_tokens=len(prompt_ids))

    def __iter__(self):
        model, params = self.model, self.params
        t0 = time.perf_counter()
        cache = model.new_cache(len(self.prompt_ids) + self.max_new, len(self.prompt_ids))
        logits = forward(model, [self.prompt_ids], [cache])  # [1, V]
        t1 = time.perf_counter()
        self.usage.prompt_seconds = t1 - t0
        choices = self.new_choices(cache)
        rows = [to_numpy(logits[0])] * params.n
        while True:
            active = [i for i, c in enumerate(choices) if not c.finished]
            for i, row in zip(active, rows):
                yield self.step(i, choices[i], row)
            active = [i for i in active if not choices[i].finished]
            self.usage.completion_seconds = time.perf_counter() - t1
            if not active:
                return
            logits = forward(model, [[choices[i].generated[-1]] for i in active], [choices[i].cache for i in active])
            rows = list(to_numpy(logits))

    def new_choices(self, cache):
        """The n choices after the prompt: the first keeps the prompt's cache, the others copy it."""
        seeds = np.random.SeedSequence(self.params.seed).spawn(self.params.n)  # independent streams per choice
        grammar = self.params.grammar
        return [Choice(np.random.default_rng(s), cache if i == 0 else self.copy_of(cache), TextStream(self.params.stop),
                       grammar=None if grammar is None else grammar.matcher())
                for i, s in enumerate(seeds)]

    def copy_of(self, cache):
        twin = self.model.new_cache(cache.capacity, cache.prompt_length)
        twin.copy_prefix(self.model.xp, cache, cache.length)
        return twin

    def step(self, index, choice, row):
        """Sample one token for one choice from its logits row [V] and turn it into an Event."""
        params = self.params
        allowed = None if choice.grammar is None else choice.grammar.allowed(row.shape[-1])
        step = sample(row, params, choice.rng, seen=self.prompt_ids + choice.generated, generated_counts=choice.counts,
                      allowed=allowed)
        token = step.token
        if choice.grammar is not None:
            choice.grammar.advance(token)
        choice.generated.append(token)
        choice.counts[token] += 1
        self.usage.completion_tokens += 1
        # A token's first byte lands in the character that begins at the current end of the text
        # (bytes of an unfinished character are pending there, not yet text).
        offset = len(choice.text.text)
        insight = explain(self.tokenizer, row, step, params, params.explain) if params.explain else None
        logprobs = None
        if params.logprobs:
            lp = to_numpy(log_softmax(HOST, row.astype(np.float64)))
            logprobs = token_logprobs(self.tokenizer, lp, token, params.top_logprobs)
        if token in self.stop_ids:  # not part of the text; its logprobs are there for who scores it
            choice.finished = True
            return Event(index, token, choice.text.finish(), logprobs, "stop", offset, insight, stop_token=True)
        text = choice.text.push(self.tokenizer.token_bytes(token))
        # A grammar that has ended (its end token is not among the stop ids) ends the choice too.
        ended = choice.text.stopped or (choice.grammar is not None and choice.grammar.finished)
        finish = "stop" if ended else "length" if len(choice.generated) >= self.max_new else None
        if finish is not None:
            text += choice.text.finish()  # nothing after a stop string; else what was held back
        choice.finished = finish is not None
        return Event(index, token, text, logprobs, finish, offset, insight)


def generate(model, tokenizer, prompt_ids, params, stop_ids=()):
    """Start generating; raises InvalidParameter or ContextLengthExceeded before any work is done."""
    return Generation(model, tokenizer, prompt_ids, params, stop_ids)


# Prompts are scored this many positions at a time: the logits of a whole prompt at once would take
# T x V floats (8192 tokens x 49152: 1.6 GB), a chunk's take 50 MB whatever the prompt's length.
SCORE_CHUNK = 256


def prompt_logprobs(model, tokenizer, ids, top=0):
    """log p(token i | tokens before i) for every prompt token: None for the first, which has no prefix."""
    entries = [None]
    for lo, rows in logprob_rows(model, ids):
        entries += [token_logprobs(tokenizer, row, token, top) for row, token in zip(rows, ids[lo + 1:])]
    return entries


def logprob_rows(model, ids, prompt_length=None):
    """Yield (lo, rows) a chunk at a time: rows[t] is log p(next token | ids[:lo + t + 1]) over the
    whole vocabulary, a NumPy [T, V] array (the last row predicts the token after ids).

    The first prompt_length tokens (all by default) go SCORE_CHUNK at a time, as a prompt; the rest,
    tokens a server generated, one at a time, as generation computes them, so that each row has the
    bits a refimpl server reports for it (batching.py)."""
    prompt_length = len(ids) if prompt_length is None else min(prompt_length, len(ids))
    cache = model.new_cache(len(ids), prompt_length)
    starts = [*range(0, prompt_length, SCORE_CHUNK), *range(prompt_length, len(ids))]
    for lo, hi in zip(starts, [*starts[1:], len(ids)]):
        logits = forward(model, [ids[lo:hi]], [cache], all_logits=True)
        yield lo, to_numpy(log_softmax(model.xp, logits))


def chunk_logprobs(xp, tokenizer, logits, next_ids, top):
    """Entries for the tokens that logits rows [T, V] predict: next_ids, one per row (the last row
    of a prompt predicts no prompt token, so next_ids may be one shorter)."""
    lp = to_numpy(log_softmax(xp, logits))  # [T, V]
    return [token_logprobs(tokenizer, lp[t], token, top) for t, token in enumerate(next_ids)]


def load(path, device="cpu"):
    """The model, its tokenizer and its end-of-sequence ids, from an HF-layout directory."""
    model = load_model(path, device)
    tokenizer = Tokenizer.from_dir(path)
    return model, tokenizer, default_stop_ids(tokenizer, model.config, path)


def default_stop_ids(tokenizer, model_config, model_dir=None):
    """The model's end-of-sequence ids: the tokenizer's EOS, config.json's and generation_config.json's
    eos_token_id (Llama 3 lists its end-of-turn tokens there)."""
    ids = {tokenizer.eos_token_id} - {None}
    sources = [model_config.eos_token_id]
    path = Path(model_dir or "", "generation_config.json")
    if model_dir and path.exists():
        sources.append(json.loads(path.read_text()).get("eos_token_id"))
    for eos in sources:
        ids |= set(eos) if isinstance(eos, list) else {eos} - {None}
    return ids
