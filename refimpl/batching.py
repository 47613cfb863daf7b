"""Several sequences in one forward pass: the one place that knows about spans, caches and padding.

A forward call stacks the new tokens of B sequences into one [N, D] matrix, so that every weight
is read once per step for all of them; only attention needs to know which rows belong to which
sequence, and each sequence attends to its own KV cache. A family's attention calls `attend`
with its projected q, k, v and gets the attended rows back: it never sees a span or a cache.

Dimension letters as in ops.py; B sequences.
"""

import math
from dataclasses import dataclass

from refimpl.ops import attention, soft_cap


@dataclass
class Batch:
    spans: list  # (lo, hi, cache): rows lo..hi-1 of the call are that sequence's new tokens
    ids: object  # [N] the new token ids of every sequence, one after another
    positions: object  # [N] each row's position in its sequence

    @classmethod
    def of(cls, xp, tokens, caches):
        """The batch of one forward call: tokens is one list of new ids per sequence, caches their KVCaches."""
        spans, positions, lo = [], [], 0
        for ids, cache in zip(tokens, caches, strict=True):
            spans.append((lo, lo + len(ids), cache))
            positions.append(xp.arange(cache.length, cache.length + len(ids)))
            lo += len(ids)
        ids = xp.asarray([t for seq in tokens for t in seq], dtype=xp.int64)
        return cls(spans, ids, positions[0] if len(positions) == 1 else xp.concat(positions))

    def advance(self):
        """After the last layer: each cache now holds its new tokens."""
        for lo, hi, cache in self.spans:
            cache.length += hi - lo

    def last_rows(self, xp, x):
        """The last row of each sequence [B, D]: only it predicts the sequence's next token."""
        return xp.take(x, xp.asarray([hi - 1 for _, hi, _ in self.spans]), axis=0)


def attend(xp, batch, layer, q, k, v, window, scale=None, softcap=None):
    """Write each sequence's new keys and values k, v [N, Hkv, Dh] into its cache at `layer`, then
    attend its queries q [N, H, Dh] to everything its cache holds; returns [N, H*Dh].
    `scale` and `softcap` as in ops.attention (None: 1/sqrt(Dh), no cap)."""
    # Rows lo..hi-1 belong to the sequence whose cache this is; each writes its new keys and values.
    kv = [cache.write(xp, layer, cache.length, k[lo:hi, ...], v[lo:hi, ...]) for lo, hi, cache in batch.spans]
    if len(batch.spans) > 1 and q.shape[0] == len(batch.spans):  # every sequence decodes one token
        return decode_attention(xp, q, [keys for keys, _ in kv], [values for _, values in kv], window, scale, softcap)
    outs = [attention(xp, q[lo:hi, ...], keys, values, cache.length, window, scale, softcap)
            for (lo, hi, cache), (keys, values) in zip(batch.spans, kv)]
    return outs[0] if len(outs) == 1 else xp.concat(outs, axis=0)  # [N, H*Dh]


def decode_attention(xp, q, keys, values, window, scale=None, softcap=None):
    """Attention for B sequences that each decode one token, as one batch instead of B small ones.

    q [B, H, Dh]; keys[b], values[b] [Hkv, S_b, Dh] hold sequence b's keys up to and including
    the new token's. They are copied into one zero-padded [B, Hkv, S, Dh] pair and the padding
    is masked with -inf, so three batched products serve all B sequences (ops.attention_block's
    math, batched).
    """
    B, H, Dh = q.shape
    if window is not None:  # a sequence's one query sees only its last `window` keys
        keys = [k[:, max(0, k.shape[1] - window):, :] for k in keys]
        values = [v[:, max(0, v.shape[1] - window):, :] for v in values]
    Hkv, lengths = keys[0].shape[0], [k.shape[1] for k in keys]
    S, G = max(lengths), H // Hkv
    K, V = xp.zeros((B, Hkv, S, Dh), dtype=q.dtype), xp.zeros((B, Hkv, S, Dh), dtype=q.dtype)
    for b, (k, v) in enumerate(zip(keys, values)):
        K[b, :, :k.shape[1], :] = k
        V[b, :, :v.shape[1], :] = v
    scale = (1.0 / math.sqrt(Dh)) if scale is None else scale
    q = xp.reshape(q, (B, Hkv, G, Dh)) * scale
    scores = q @ xp.matrix_transpose(K)  # [B, Hkv, G, S]
    if softcap is not None:  # Gemma 2: capped before the padding mask, as in ops.attention_block
        scores = soft_cap(xp, scores, softcap)
    real = xp.arange(S)[None, :] < xp.asarray(lengths)[:, None]  # [B, S]: not padding
    scores = xp.where(real[:, None, None, :], scores, -math.inf)
    weights = xp.exp(scores - xp.max(scores, axis=-1, keepdims=True))
    out = (weights @ V) / xp.sum(weights, axis=-1, keepdims=True)  # [B, Hkv, G, Dh]
    return xp.reshape(out, (B, H * Dh))
