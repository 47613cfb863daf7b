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
(max_tokens, or the end of the context window). A stop token is not part of the text.
"""

import codecs
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refimpl.explain import explain, most_likely, token_text
from refimpl.model import forward
from refimpl.sampling import log_softmax, sample
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


class TextStream:
    """Token bytes in, text deltas out: no partial characters, nothing that belongs to a stop string."""

    def __init__(self, stop_strings=()):
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop_strings = list(stop_strings)
        self.text = ""  # everything decoded so far (cut at a stop string once found)
        self.sent = 0  # how much of text has been released
        self.stopped = False

    def push(self, token_bytes):
        """Add one token's bytes; return the text that can be released now."""
        if self.stopped:  # the text ended at a stop string: nothing after it is ever released
            return ""
        self.text += self.utf8.decode(token_bytes)
        return self._release(final=False)

    def finish(self):
        """The generation ended: release what was held back (an incomplete character becomes U+FFFD)."""
        if self.stopped:  # bytes of a half-decoded character after the stop string are not text
            return ""
        self.text += self.utf8.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final):
        # Released text never ends with the start of a stop string (see below), so a stop string
        # can only begin in the unreleased part.
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop_strings) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            final = True
        end = len(self.text) if final else len(self.text) - self.pending_stop_prefix()
        delta, self.sent = self.text[self.sent:end], max(self.sent, end)
        return delta

    def pending_stop_prefix(self):
        """Length of the longest unreleased tail of the text that begins some stop string."""
        tail = self.text[self.sent:]
        return max((k for s in self.stop_strings for k in range(min(len(s) - 1, len(tail)), 0, -1)
                    if s.startswith(tail[-k:])), default=0)


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
        cache = model.new_cache(len(self.prompt_ids) + self.max_new)
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
        return [Choice(np.random.default_rng(s), cache if i == 0 else self.copy_of(cache), TextStream(self.params.stop))
                for i, s in enumerate(seeds)]

    def copy_of(self, cache):
        twin = self.model.new_cache(cache.capacity)
        twin.copy_prefix(self.model.xp, cache, cache.length)
        return twin

    def step(self, index, choice, row):
        """Sample one token for one choice from its logits row [V] and turn it into an Event."""
        params = self.params
        step = sample(row, params, choice.rng, seen=self.prompt_ids + choice.generated, generated_counts=choice.counts)
        token = step.token
        choice.generated.append(token)
        choice.counts[token] += 1
        self.usage.completion_tokens += 1
        # A token's first byte lands in the character that begins at the current end of the text
        # (bytes of an unfinished character are pending there, not yet text).
        offset = len(choice.text.text)
        insight = explain(self.tokenizer, row, step, params, params.explain) if params.explain else None
        if token in self.stop_ids:  # not part of the text, nor of the logprobs
            choice.finished = True
            return Event(index, token, choice.text.finish(), None, "stop", offset, insight)
        logprobs = None
        if params.logprobs:
            lp = to_numpy(log_softmax(HOST, row.astype(np.float64)))
            logprobs = token_logprobs(self.tokenizer, lp, token, params.top_logprobs)
        text = choice.text.push(self.tokenizer.token_bytes(token))
        finish = "stop" if choice.text.stopped else "length" if len(choice.generated) >= self.max_new else None
        if finish == "length":
            text += choice.text.finish()
        choice.finished = finish is not None
        return Event(index, token, text, logprobs, finish, offset, insight)


def generate(model, tokenizer, prompt_ids, params, stop_ids=()):
    """Start generating; raises InvalidParameter or ContextLengthExceeded before any work is done."""
    return Generation(model, tokenizer, prompt_ids, params, stop_ids)


def prompt_logprobs(model, tokenizer, ids, top=0):
    """log p(token i | tokens before i) for every prompt token: None for the first, which has no prefix."""
    cache = model.new_cache(len(ids))
    lp = to_numpy(log_softmax(model.xp, forward(model, [ids], [cache], all_logits=True)))  # [T, V]
    return [None] + [token_logprobs(tokenizer, lp[i - 1], ids[i], top) for i in range(1, len(ids))]


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
