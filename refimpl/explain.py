"""Why this token: what the model and the sampler saw at one step, put for people.

The web chat's token view shows, for every generated token, how likely the model found it and
what else it could have said. Everything here is read off the real step, never recomputed
elsewhere: the model's raw logits row, and the sampler's SamplerStep (its probabilities after
temperature and which filter removed which token).

Two distributions appear side by side, and they differ on purpose:
- p, the model's own: the softmax of the raw logits (the same numbers logprobs reports);
- p_temp, what the sampler drew from: after penalties, bias and temperature, before top-k,
  top-p and min-p cut tokens away (and `kept` says which survived).
"""

from dataclasses import dataclass

import numpy as np

from refimpl.sampling import log_softmax
from refimpl.xp import namespace

HOST = namespace("cpu")


@dataclass
class Alternative:
    token_id: int
    text: str  # the token's own text; U+FFFD where it holds only part of a character
    bytes: list
    special: bool  # a control token such as <|im_end|>: text is its marker, bytes are empty
    p: float  # the model's raw probability
    p_temp: float  # the sampler's probability, after temperature, before the filters
    kept: bool  # survived top-k, top-p and min-p
    removed_by: str | None  # None, "temperature", "top_k", "top_p" or "min_p" (see SamplerStep.removed_by)
    chosen: bool


@dataclass
class TokenInsight:
    p: float  # the chosen token's raw probability
    logprob: float
    rank: int  # 1 for the most likely token (ties to the lower id)
    alternatives: list  # Alternative: the most likely tokens by p, then the chosen one if it is not among them
    other_p: float  # raw probability mass of every token not listed
    other_p_temp: float  # the same after temperature
    top_p_cut: dict | None  # {"top_p": setting, "mass": of the set it kept} when top_p < 1


def token_text(tokenizer, token_id):
    """(text, bytes) of one token as log-probabilities report it: its exact bytes, decoded with U+FFFD
    for a partial character; a special token, which adds no bytes to the text, by its marker (e.g.
    "<|im_end|>") and the marker's bytes, as OpenAI and vLLM report it."""
    if token_id in tokenizer.special_ids:
        marker = tokenizer.decode([token_id])
        return marker, list(marker.encode())
    raw = tokenizer.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def token_label(tokenizer, token_id):
    """(text, bytes, special): what a token view shows for a token; a special one is named by its marker."""
    if token_id in tokenizer.special_ids:
        return tokenizer.decode([token_id]), [], True
    return (*token_text(tokenizer, token_id), False)


def most_likely(scores, count):
    """Ids of the `count` highest scores [V], highest first, ties to the lower id."""
    if count == 0:
        return []
    ids = np.argpartition(-scores, count - 1)[:count]
    return sorted(ids.tolist(), key=lambda i: (-scores[i], i))


def explain(tokenizer, logits, step, params, count):
    """A TokenInsight for the token `step` drew from the raw logits row [V] (host array)."""
    logprobs = np.asarray(log_softmax(HOST, np.asarray(logits, dtype=np.float64)))
    p = np.exp(logprobs)
    token = step.token
    # Rank: how many tokens beat it (a higher probability, or an equal one with a lower id).
    rank = 1 + int(np.sum(logprobs > logprobs[token]) + np.sum(logprobs[:token] == logprobs[token]))
    listed = most_likely(logprobs, count)
    if token not in listed:
        listed.append(token)
    alternatives = [Alternative(i, *token_label(tokenizer, i), float(p[i]), float(step.probs[i]), bool(step.kept[i]),
                                step.removed_by(i), i == token) for i in listed]
    top_p_cut = None if step.top_p_mass is None else {"top_p": params.top_p, "mass": step.top_p_mass}
    # 1 - sum(listed) can come out a hair below 0 in floating point; the mass is never negative.
    return TokenInsight(float(p[token]), float(logprobs[token]), rank, alternatives,
                        max(0.0, 1.0 - float(p[listed].sum())), max(0.0, 1.0 - float(step.probs[listed].sum())),
                        top_p_cut)
