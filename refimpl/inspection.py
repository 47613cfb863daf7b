"""Looking inside: what each layer would predict, and where each attention head looks.

Two views of one forward pass over a prompt, both read off the pass itself:

- The logit lens. Every block adds its output to the residual stream, a [T, D] array that
  starts as the token embeddings and ends, through the final norm and the output head, as the
  logits. Sending the stream as it stands after block l through that same final norm and head
  shows what the model "would say" if it stopped there: layer 0 is the embeddings alone, layer
  L (num_hidden_layers) is the model's real distribution. Reading a position's layers in order
  shows where its prediction forms. (nostalgebraist, "interpreting GPT: the logit lens", 2020.)
- Attention weights. In each layer each query head spreads its attention over the earlier
  positions: row t of head h is the softmax of query t's scores against keys 0..t, summing to 1,
  zero outside a sliding window. Heads are numbered as transformers' `output_attentions`
  numbers them: query heads, head h reading key/value head h // (H / Hkv).

How it is captured. The families compute exactly as they do for serving; the KV cache of the
sequence being inspected carries a Probe (KVCache.probe), and two places hand it what it keeps:
the family's forward calls `batch.record(layer, x)` with the residual stream before the blocks
and after each one, and `batching.attend` passes each layer's queries and keys (after RoPE and
any QK norm) with the layer's window, scale and soft cap. Without a probe, both are a skipped
`if`. Layer L's lens is the forward pass's own logits, so it equals the reported logprobs; the
other layers go through the family's `output_logits` (final norm, head, any final soft cap).

Limits keep a response small (LIMITS below); `request` says how to narrow a request that is too
large. Shapes: T prompt tokens, P positions looked at, L blocks, H query heads, V vocabulary.
"""

from dataclasses import dataclass

import numpy as np

from refimpl.models import forward, output_logits
from refimpl.ops import attention_weights
from refimpl.sampling import log_softmax
from refimpl.xp import to_numpy

# The bounds of one inspection, so that a response stays a few megabytes and a few seconds.
MAX_TOKENS = 1024  # prompt tokens
MAX_TOP = 20  # logit-lens candidates per position and layer
MAX_LENS_ROWS = 8192  # positions x (L + 1) layers sent through the output head
MAX_LENS_ENTRIES = 100_000  # positions x (L + 1) x top candidates in the response
MAX_ATTENTION_WEIGHTS = 1_000_000  # (layer, head) pairs x the weights of the rows asked for
LENS_ROWS = 512  # residual rows sent through the output head at once: 512 x V floats, 100 MB for V = 49152
LIMITS = {"max_tokens": MAX_TOKENS, "max_top": MAX_TOP, "max_lens_rows": MAX_LENS_ROWS,
          "max_lens_entries": MAX_LENS_ENTRIES, "max_attention_weights": MAX_ATTENTION_WEIGHTS}


class InspectionError(ValueError):
    """A request this module cannot serve; the message says what to change. `param` names the field,
    `too_large` says it is a limit (narrow the request) rather than a value that cannot be."""

    def __init__(self, message, param=None, too_large=False):
        super().__init__(message)
        self.param, self.too_large = param, too_large


@dataclass(frozen=True)
class Request:
    """What to look at in a prompt of `n_tokens` tokens, each field already checked (see `request`)."""

    positions: tuple  # the query positions looked at, ascending (default: all)
    top: int | None  # logit-lens candidates per layer; None: no logit lens
    pairs: tuple  # (layer, head) pairs whose attention weights are returned; () for none


@dataclass
class LensRow:
    """What one layer's residual stream predicts at one position."""

    top: list  # [(token_id, logprob)] the most likely tokens, best first
    next_rank: int | None  # the rank of the token that actually comes next (1: the top one); None at the end
    next_logprob: float | None
    entropy: float  # of the whole distribution, in nats


@dataclass
class Inspection:
    token_ids: list  # [T]
    logprobs: list  # [T] log p(token t | tokens before it); None for the first
    positions: list  # [P] the positions looked at
    lens: list | None  # [P][L + 1] LensRow, or None when not asked for
    attention: dict  # (layer, head) -> [P] rows: row i holds positions[i] + 1 weights


def request(config, n_tokens, positions=None, top=None, layers=None, heads=None):
    """Check what is asked of a prompt of n_tokens against the model and LIMITS: an InspectionError
    that says how to narrow it, or the Request. layers / heads: lists of ints or "all"; both None
    (or either empty): no attention."""
    L, H = config.num_hidden_layers, config.num_attention_heads
    if n_tokens == 0:
        raise InspectionError("the prompt has no tokens", "prompt")
    if n_tokens > MAX_TOKENS:
        raise InspectionError(f"the prompt has {n_tokens} tokens; an inspection takes at most {MAX_TOKENS}: "
                              "inspect a shorter prompt", "prompt", too_large=True)
    if positions is None:
        positions = range(n_tokens)
    bad = [p for p in positions if not 0 <= p < n_tokens]
    if bad:
        raise InspectionError(f"position {bad[0]} is not in the prompt (positions 0 to {n_tokens - 1})", "positions")
    positions = tuple(sorted(set(positions)))
    if not positions:
        raise InspectionError("positions is empty: name at least one position, or leave it out for all", "positions")

    if top is not None and not 1 <= top <= MAX_TOP:
        raise InspectionError(f"logit_lens.top must be 1 to {MAX_TOP}, not {top}", "logit_lens.top")
    if top is not None:
        rows = len(positions) * (L + 1)
        if rows > MAX_LENS_ROWS:
            raise InspectionError(f"the logit lens over {len(positions)} positions x {L + 1} layers is {rows} rows; "
                                  f"at most {MAX_LENS_ROWS}: ask for at most {MAX_LENS_ROWS // (L + 1)} positions "
                                  "(`positions`) or a shorter prompt", "logit_lens", too_large=True)
        if rows * top > MAX_LENS_ENTRIES:
            raise InspectionError(f"the logit lens over {len(positions)} positions x {L + 1} layers x top {top} is "
                                  f"{rows * top} entries; at most {MAX_LENS_ENTRIES}: ask for a smaller top "
                                  f"(at most {max(1, MAX_LENS_ENTRIES // rows)} here) or fewer positions",
                                  "logit_lens.top", too_large=True)

    pairs = ()
    if layers is not None and heads is not None:
        layers = range(L) if layers == "all" else layers
        heads = range(H) if heads == "all" else heads
        for name, values, count in (("layers", layers, L), ("heads", heads, H)):
            bad = [i for i in values if not 0 <= i < count]
            if bad:
                raise InspectionError(f"attention.{name} names {bad[0]}; this model has {count} {name}, "
                                      f"numbered 0 to {count - 1}", f"attention.{name}")
        pairs = tuple((layer, head) for layer in sorted(set(layers)) for head in sorted(set(heads)))
        weights = len(pairs) * sum(p + 1 for p in positions)
        if weights > MAX_ATTENTION_WEIGHTS:
            raise InspectionError(f"{len(pairs)} (layer, head) pairs x {sum(p + 1 for p in positions)} weights per "
                                  f"head is {weights}; at most {MAX_ATTENTION_WEIGHTS}: ask for fewer layers or "
                                  "heads, fewer positions (`positions`), or a shorter prompt", "attention",
                                  too_large=True)
    return Request(positions, top, pairs)


class Probe:
    """What an inspected sequence's forward pass hands over (batching.py calls it): the residual
    stream before the blocks and after each, and the attention weights of the pairs asked for,
    only at the positions asked for."""

    def __init__(self, xp, asked):
        self.xp = xp
        self.keep_residual = asked.top is not None
        self.positions = set(asked.positions)
        self.heads = {}  # layer -> the heads of it asked for
        for layer, head in asked.pairs:
            self.heads.setdefault(layer, []).append(head)
        self.residuals = {}  # layer -> [chunks of [T, D]]
        self.rows = {}  # (layer, position p) -> [heads asked for, p + 1] weights: only the rows asked for are kept

    def residual(self, layer, x):
        if self.keep_residual:
            self.residuals.setdefault(layer, []).append(x)

    def attention(self, layer, q, k, start, window, scale, softcap):
        if layer not in self.heads:
            return
        weights = to_numpy(attention_weights(self.xp, q, k, start, window, scale, softcap))  # [H, T, S]
        for t in range(q.shape[0]):
            if start + t in self.positions:
                self.rows[layer, start + t] = weights[self.heads[layer], t, :start + t + 1]

    def residual_rows(self, layer, positions):
        """The residual stream entering block `layer` at `positions`: [P, D]."""
        x = self.xp.concat(self.residuals[layer], axis=0)  # [T, D]
        return self.xp.take(x, self.xp.asarray(np.array(positions, dtype=np.int64)), axis=0)

    def attention_rows(self, layer, head, positions):
        """Head `head` of `layer` at the query `positions`: row i, positions[i] + 1 weights."""
        i = self.heads[layer].index(head)
        return [self.rows[layer, p][i] for p in positions]


def inspect(model, ids, asked):
    """One forward pass over the prompt `ids` with a probe, and what `asked` (a Request) wants of it."""
    xp, T = model.xp, len(ids)
    cache = model.new_cache(T)  # every position a prompt's: no decoding rows
    cache.probe = Probe(xp, asked)
    logits = forward(model, [list(ids)], [cache], all_logits=True)  # [T, V]
    final = to_numpy(log_softmax(xp, logits))  # [T, V]
    logprobs = [None] + [float(final[t - 1, ids[t]]) for t in range(1, T)]

    lens = None
    if asked.top is not None:
        L, P = model.config.num_hidden_layers, len(asked.positions)
        nexts = [ids[p + 1] if p + 1 < T else None for p in asked.positions]
        lens = [[None] * (L + 1) for _ in range(P)]
        for i, p in enumerate(asked.positions):  # layer L: the model's own distribution, the very numbers of `logprobs`
            lens[i][L] = lens_row(final[p], nexts[i], asked.top)
        # Layers 0..L-1 through the output head, the rows of several layers stacked into one product
        # (the norm works row by row), so that the [D, V] head is read once per LENS_ROWS rows.
        rows = [(layer, i) for layer in range(L) for i in range(P)]
        x = xp.concat([cache.probe.residual_rows(layer, asked.positions) for layer in range(L)], axis=0)  # [L P, D]
        for lo in range(0, len(rows), LENS_ROWS):
            hi = min(lo + LENS_ROWS, len(rows))  # the Array API has no slices past the end
            lp = to_numpy(log_softmax(xp, output_logits(model, x[lo:hi, ...])))  # [hi - lo, V]
            for (layer, i), row in zip(rows[lo:hi], lp):
                lens[i][layer] = lens_row(row, nexts[i], asked.top)

    attention = {(layer, head): cache.probe.attention_rows(layer, head, asked.positions)
                 for layer, head in asked.pairs}
    return Inspection(list(ids), logprobs, list(asked.positions), lens, attention)


def lens_row(logprobs, next_id, top):
    """The top candidates, the next token's rank and log-probability, and the entropy of one row [V]."""
    kth = np.partition(logprobs, len(logprobs) - top)[len(logprobs) - top]  # the top-th largest, without sorting V
    # Every token at least that likely, best first, a tie to the lower id (as a stable sort would):
    # argpartition alone would keep an arbitrary one of the tokens tied at the top-th place.
    best = sorted(np.flatnonzero(logprobs >= kth), key=lambda i: (-logprobs[i], i))[:top]
    p = np.exp(logprobs.astype(np.float64))
    entropy = float(-np.sum(p * logprobs))
    if next_id is None:
        return LensRow([(int(i), float(logprobs[i])) for i in best], None, None, entropy)
    rank = int(np.sum(logprobs > logprobs[next_id])) + 1
    return LensRow([(int(i), float(logprobs[i])) for i in best], rank, float(logprobs[next_id]), entropy)
