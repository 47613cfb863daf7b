"""From next-token logits to a chosen token, as the OpenAI API's parameters promise.

The transforms apply in this order, which is Hugging Face's where the two overlap:

  1. logit_bias          add the request's bias to listed tokens (-100 bans, +100 all but forces)
  2. repetition_penalty  HF's formula over every token seen (prompt and generated): a positive
                         logit is divided by the penalty, a negative one multiplied
  3. presence_penalty,   OpenAI's formula over the generated tokens only:
     frequency_penalty   logit -= frequency_penalty * count + presence_penalty * (count > 0)
  4. grammar             constrained decoding (response_format, tools): every token the request's
                         grammar does not allow next gets -inf, so it can never be drawn (grammar.py)
  5. temperature         divide by T; T = 0 means greedy: the argmax, ties to the lowest id
  6. top_k               keep the k most likely tokens (exactly k: ties go to the lower id,
                         where HF would keep every token tied with the k-th)
  7. top_p               keep the smallest set of most likely tokens whose mass reaches p
  8. min_p               keep tokens with probability >= min_p * the top probability

then one draw from the kept tokens' renormalised probabilities, with the request's own seeded
NumPy Generator, so that CPU and GPU runs sample alike.

Log-probabilities reported to the user are not taken from this pipeline: they are the
log-softmax of the model's raw logits (`log_softmax` below, the one place they are computed).
An evaluator comparing engines needs the model's distribution, not the sampler's.

The sampler works on the host in float64: one [V] row per step is small, and float64 keeps
probabilities finite and summing to 1 for logits as wild as +-1e30 or -inf.
"""

import math
from dataclasses import dataclass, field

import numpy as np

FLOAT64_MAX = np.finfo(np.float64).max
# Limits of one request's parameters, checked here only (the server's schemas quote them). A server
# bounds n further by how many sequences it decodes at once (refimpl.engine's max_seqs).
MAX_N = 128
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20
# The stop strings of one request may total this many characters. Matching costs O(1) per generated
# character whatever their length, but each choice builds a trie node per character of them; real
# stop strings are a few characters ("\n\n", "</s>", "User:"), so 16 of 256 characters is generous.
# (OpenAI takes 4 stop strings and states no length limit; vLLM and mistral.rs set none.)
MAX_STOP_CHARS = 4096


class InvalidParameter(ValueError):
    """A request parameter is out of range; `param` names it (the server answers 400)."""

    def __init__(self, param, message):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None  # None, 0 or -1: all tokens
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict = field(default_factory=dict)  # token id -> bias in [-100, 100]
    seed: int | None = None
    max_tokens: int | None = None  # None: up to the end of the context window
    n: int = 1
    stop: list = field(default_factory=list)  # stop strings
    stop_token_ids: list = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    explain: int = 0  # alternatives listed in each Event's insight (the web chat's token view); 0: none
    grammar: object = None  # a grammar.Grammar every choice's output must match (step 4), or None

    def __post_init__(self):
        if isinstance(self.stop, str):  # OpenAI takes one stop string or a list of them
            self.stop = [self.stop]

    def validate(self, vocab_size):
        """Raise InvalidParameter naming the first parameter out of range."""
        def check(ok, param, message):
            if not ok:
                raise InvalidParameter(param, f"{param} {message}")

        # bool is a subclass of int in Python, but `"n": true` in a request is a mistake, not 1.
        def number(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        def integer(x):
            return isinstance(x, int) and not isinstance(x, bool)

        check(number(self.temperature) and 0 <= self.temperature <= 2, "temperature", "must be between 0 and 2")
        check(number(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be greater than 0 and at most 1")
        check(self.top_k is None or (integer(self.top_k) and self.top_k >= -1), "top_k",
              "must be a positive integer, or 0 or -1 for all tokens")
        check(number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be between 0 and 1")
        check(number(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty",
              "must be between -2 and 2")
        check(number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty",
              "must be between -2 and 2")
        check(number(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
              "must be greater than 0")
        check(isinstance(self.logit_bias, dict), "logit_bias", "must be a map from token ids to biases")
        for token, bias in self.logit_bias.items():
            check(integer(token) and 0 <= token < vocab_size, "logit_bias",
                  f"key {token!r} is not a token id of this vocabulary (0..{vocab_size - 1})")
            check(number(bias) and -100 <= bias <= 100, "logit_bias", f"value for token {token} must be between -100 and 100")
        # numpy's SeedSequence, which turns the seed into each choice's generator, takes no negative seed.
        check(self.seed is None or (integer(self.seed) and self.seed >= 0), "seed", "must be a non-negative integer")
        check(self.max_tokens is None or (integer(self.max_tokens) and self.max_tokens >= 1), "max_tokens",
              "must be at least 1")
        check(integer(self.n) and 1 <= self.n <= MAX_N, "n", f"must be between 1 and {MAX_N}")
        check(isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) and s for s in self.stop)
              and len(self.stop) <= MAX_STOP, "stop", f"must be up to {MAX_STOP} non-empty strings")
        total = sum(map(len, self.stop))
        check(total <= MAX_STOP_CHARS, "stop",
              f"strings may total at most {MAX_STOP_CHARS} characters; these total {total}")
        check(isinstance(self.stop_token_ids, (list, tuple))  # the API takes stop token ids in `stop`
              and all(integer(t) and 0 <= t < vocab_size for t in self.stop_token_ids), "stop",
              f"token ids must be token ids of this vocabulary (0..{vocab_size - 1})")
        check(isinstance(self.logprobs, bool), "logprobs", "must be true or false")
        check(integer(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs",
              f"must be between 0 and {MAX_TOP_LOGPROBS}")
        check(integer(self.explain) and 0 <= self.explain <= 50, "explain", "must be between 0 and 50")
        return self

    @property
    def greedy(self):
        return self.temperature == 0


def log_softmax(xp, logits):
    """Log-probabilities of logits [..., V], stably: shift by the maximum before exp."""
    shifted = logits - xp.max(logits, axis=-1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))


def apply_penalties(logits, params, seen, generated_counts):
    """Steps 1-3: logit_bias, repetition_penalty over `seen` ids, OpenAI penalties over generated counts."""
    logits = np.array(logits, dtype=np.float64)  # a copy: the caller's row is left alone
    for token, bias in params.logit_bias.items():
        logits[token] += bias
    if params.repetition_penalty != 1.0 and len(seen):
        ids = np.unique(np.asarray(seen, dtype=np.int64))
        row = logits[ids]
        with np.errstate(over="ignore"):
            penalised = np.where(row > 0, row / params.repetition_penalty, row * params.repetition_penalty)
        # An extreme penalty must not push a finite logit to +-inf: softmax needs a finite maximum.
        logits[ids] = np.where(np.isfinite(row), np.clip(penalised, -FLOAT64_MAX, FLOAT64_MAX), row)
    if (params.presence_penalty or params.frequency_penalty) and generated_counts:
        ids = np.fromiter(generated_counts.keys(), dtype=np.int64)
        counts = np.fromiter(generated_counts.values(), dtype=np.float64)
        logits[ids] -= params.frequency_penalty * counts + params.presence_penalty
    return logits


def softmax(logits, temperature=1.0):
    """Probabilities of a float64 logits row at a temperature (step 5); -inf becomes exactly 0."""
    top = np.max(logits)
    # Shift by the maximum before dividing by T: with a tiny T, 1e30 / T would be inf and
    # inf - inf NaN, whereas (x - max) / T is at most 0 (at worst -inf: probability 0, as meant).
    with np.errstate(over="ignore"):
        shifted = (logits - top) / temperature  # [V]
    e = np.exp(shifted)
    return e / e.sum()


def filter_mask(probs, params):
    """Steps 6-8 on probabilities after temperature: a boolean mask of the tokens kept."""
    return filter_stages(probs, params)[0]


def filter_stages(probs, params):
    """Steps 6-8, one filter at a time: (kept, stages, top_p_mass).

    kept is the mask of the tokens that survive every filter; stages lists (name, mask of the
    tokens that filter kept) for each filter that is on, in the order they apply, so that a
    teaching view can say which filter removed a token; top_p_mass is the mass, relative to what
    top-k left, of the smallest most-likely set that reaches top_p (None when top_p is 1).
    """
    keep, stages, top_p_mass = probs > 0, [], None
    k = params.top_k
    if k is not None and 0 < k < probs.size:
        kth = np.partition(probs, -k)[-k]  # the k-th largest probability
        top_k_keep = probs > kth
        ties = np.flatnonzero(probs == kth)[:k - top_k_keep.sum()]  # exactly k: ties go to the lower ids
        top_k_keep[ties] = True
        keep &= top_k_keep
        stages.append(("top_k", top_k_keep))
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")  # most likely first, ties to the lower id
        kept_probs = np.where(keep[order], probs[order], 0.0)
        total = kept_probs.sum()
        mass_before = np.cumsum(kept_probs) - kept_probs  # mass of the more likely kept tokens
        top_p_keep = np.zeros_like(keep)
        # Smallest prefix reaching p. Divide the mass rather than multiply p: p * total can
        # underflow to 0 for a tiny p, and then not even the most likely token would be kept.
        top_p_keep[order] = mass_before / total < params.top_p
        top_p_mass = float(np.sum(probs * (top_p_keep & keep)) / total)
        keep &= top_p_keep
        stages.append(("top_p", top_p_keep))
    if params.min_p > 0:
        min_p_keep = probs >= params.min_p * np.max(np.where(keep, probs, 0.0))
        keep &= min_p_keep
        stages.append(("min_p", min_p_keep))
    return keep, stages, top_p_mass


@dataclass
class SamplerStep:
    """What the sampler saw at one step: enough to show a student why this token was chosen."""
    token: int
    probs: np.ndarray  # [V] after penalties, bias and temperature, before filtering
    kept: np.ndarray  # [V] bool: survived top-k, top-p and min-p
    stages: list = field(default_factory=list)  # (filter name, [V] bool kept by it), in order
    top_p_mass: float | None = None  # see filter_stages
    allowed: np.ndarray | None = None  # [V] bool: what the grammar allowed (step 4); None without one

    def removed_by(self, token):
        """Why a token could not be drawn: None (kept), "grammar" (the request's grammar forbade it),
        "temperature" (probability 0 after it: at temperature 0 only the most likely token is left),
        or the first filter that removed it."""
        if self.kept[token]:
            return None
        if self.allowed is not None and not self.allowed[token]:
            return "grammar"
        if self.probs[token] == 0:
            return "temperature"
        return next(name for name, kept in self.stages if not kept[token])


def sample(logits, params, rng, seen=(), generated_counts=None, allowed=None):
    """Choose the next token from one logits row [V] (host array); returns a SamplerStep.
    `allowed` [V] bool: the tokens the request's grammar allows next (None: no grammar)."""
    logits = apply_penalties(logits, params, seen, generated_counts or {})
    if allowed is not None:
        logits[~allowed] = -np.inf  # step 4 (apply_penalties made a copy)
    if params.greedy:
        token = int(np.argmax(logits))  # ties: the lowest id
        probs = np.zeros_like(logits)
        probs[token] = 1.0
        return SamplerStep(token, probs, probs > 0, allowed=allowed)
    probs = softmax(logits, params.temperature)
    kept, stages, top_p_mass = filter_stages(probs, params)
    # Inverse-CDF draw: the first token whose cumulative weight exceeds u * total.
    # That token has a positive weight, so it was kept; only u * total rounded up to the total
    # itself can run past the end, and then the last kept token is the one meant.
    cumulative = np.cumsum(probs * kept)  # filtered tokens weigh 0 (a product: 10x faster than np.where)
    token = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    if token == cumulative.size:
        token = int(np.flatnonzero(kept)[-1])
    return SamplerStep(token, probs, kept, stages, top_p_mass, allowed)
