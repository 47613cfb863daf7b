"""The shared equations: every model family is written in these, one function per equation.

Each takes arrays (and the array namespace `xp`) and returns arrays; none holds state. A family
file (refimpl/models/) reads as a sequence of these calls, so the differences between families
show as differences in their files, not in here.

Dimension letters: N tokens in a call (all sequences), T tokens of one sequence, S keys (cached +
new), D model width, H query heads, Hkv key/value heads, G = H / Hkv, Dh head width, F
feed-forward width, V vocabulary.
"""

import math

import numpy as np

from refimpl.xp import to_numpy

# ---------------------------------------------------------------- norms and activations


def rms_norm(xp, x, weight, eps):
    # Scale each row to unit root-mean-square, then by a learned gain: no mean, no bias.
    return x * (1.0 / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps)) * weight  # [N, D]


def silu(xp, x):
    return x / (1.0 + xp.exp(-x))


def linear(batch, x, w, name, bias):
    """x @ W (+ b): the weight named `name`, stored [in, out] (the family's arrange step).
    The batch multiplies, so that each row gets the same bits whatever shares the call (batching.py)."""
    y = batch.matmul(x, w[name + ".weight"])
    return y + w[name + ".bias"] if bias else y


def gated_mlp(xp, batch, w, x, F, bias, act):
    """A gated MLP (SwiGLU when act is silu): down(act(gate(x)) * up(x)), with gate and up stored
    side by side as one [D, 2F] matrix (mlp.gate_up_proj)."""
    gate_up = linear(batch, x, w, "mlp.gate_up_proj", bias)  # [N, 2F]
    return linear(batch, act(xp, gate_up[:, :F]) * gate_up[:, F:], w, "mlp.down_proj", bias)  # [N, D]


# Matrices wider than this are multiplied a block of columns at a time, so that the block stays in
# the processor's cache while every row reads it: the default model's output head is 113 MB.
COLUMN_BLOCK = 4096


def rowwise_matmul(xp, x, w):
    """x [N, K] @ w [K, M] as N matrix-vector products, one per row: a row's result is the same
    bits however many rows there are (one [N, K] product would not be; see batching.py)."""
    x = xp.expand_dims(x, axis=1)  # [N, 1, K]: matmul then runs one vector-matrix product per row
    M = w.shape[1]
    if M <= COLUMN_BLOCK:
        return (x @ w)[:, 0, :]
    return xp.concat([(x @ w[:, j:j + COLUMN_BLOCK])[:, 0, :] for j in range(0, M, COLUMN_BLOCK)], axis=1)


# ---------------------------------------------------------------- rotary position embeddings


def rope_inverse_frequencies(theta, head_dim, scaling=None):
    """RoPE's per-pair rotation speeds theta^(-2i/Dh), with llama3 rescaling when `scaling` says so.

    The exponent 2i/Dh is float32, as in transformers; the power and reciprocal are float64,
    rounded once to float32, so each value is correctly rounded (unless a float64 error straddles
    a float32 rounding boundary, odds ~1e-8) and the same on every CPU. A float32 pow is not:
    its last bits depend on the SIMD path. transformers' float32 values are within 2 ULP of these
    (the llama3 blend below, the same float32 steps in both, can magnify that to 4 ULP).
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)  # [Dh/2]
    inv_freq = (1.0 / theta ** exponent.astype(np.float64)).astype(np.float32)
    s = scaling
    if s is None:
        return inv_freq
    # Llama 3.1: leave high frequencies alone, divide low ones by `factor`, blend in between.
    # float32 arithmetic in transformers' order: each step is one IEEE rounding, the same on every CPU.
    old_len, factor = s["original_max_position_embeddings"], s["factor"]
    low_freq_wavelen = old_len / s["low_freq_factor"]
    high_freq_wavelen = old_len / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(xp, inv_freq, positions):
    """cos and sin of each position's rotation angles, laid out for rotate_half."""
    angles = xp.astype(positions, xp.float32)[:, None] * inv_freq[None, :]  # [N, Dh/2]
    angles = xp.concat([angles, angles], axis=-1)  # [N, Dh]
    return xp.cos(angles)[:, None, :], xp.sin(angles)[:, None, :]  # [N, 1, Dh] each


def rope(xp, x, cos, sin):
    """Rotate each (i, i + Dh/2) pair of x by its position's angle (HF's rotate-half layout)."""
    half = x.shape[-1] // 2
    rotated = xp.concat([-x[..., half:], x[..., :half]], axis=-1)  # [N, H, Dh]
    return x * cos + rotated * sin


# ---------------------------------------------------------------- attention

# A prompt's queries are attended in blocks of this many positions, aligned to multiples of it:
# the block of positions a..a+KEY_BLOCK-1 is one product per key/value head over the keys from
# its first query's window start (0 without a window) to a+KEY_BLOCK, the later ones masked.
# A query's row of that product has a place (its position - a) and a shape fixed by its position
# alone, whichever chunk of the prompt it comes in and whatever else shares the call: the same
# bits (batching.py). Rows of the block outside the chunk are zeros, and long prompts never need
# a [T, S] score matrix larger than one block's.
KEY_BLOCK = 64


def attention(xp, q, k, v, start, window, scale=None, softcap=None):
    """Causal attention of one sequence's queries q [T, H, Dh], at positions start..start+T-1,
    over its keys and values k, v [Hkv, S, Dh] at positions 0..S-1 (positions after a query's own
    are never seen; k and v may hold more, up to the end of the last query's block).

    `scale` multiplies the scores (None: 1/sqrt(Dh)); `softcap`, when set, bounds them smoothly
    to (-softcap, softcap) before the mask (Gemma 2). Both None: plain scaled dot-product attention.
    """
    T, H, Dh = q.shape
    first_block, end = start // KEY_BLOCK * KEY_BLOCK, -(-(start + T) // KEY_BLOCK) * KEY_BLOCK
    if k.shape[1] < end:  # keys held only up to the last query: pad to the block's end (never seen)
        pad = xp.zeros((k.shape[0], end - k.shape[1], k.shape[2]), dtype=k.dtype)
        k, v = xp.concat([k, pad], axis=1), xp.concat([v, pad], axis=1)
    # The chunk's queries in whole blocks: zero rows before and after it.
    q = xp.concat([xp.zeros((start - first_block, H, Dh), dtype=q.dtype), q,
                   xp.zeros((end - start - T, H, Dh), dtype=q.dtype)], axis=0)
    outs = []
    for a in range(first_block, end, KEY_BLOCK):
        k_lo = 0 if window is None else max(0, a - window + 1) // KEY_BLOCK * KEY_BLOCK
        b = a + KEY_BLOCK  # the block's end: its queries and the keys they may see end here
        q_pos, k_pos = xp.arange(a, b), xp.arange(k_lo, b)
        outs.append(attention_block(xp, q[a - first_block:b - first_block, ...], k[:, k_lo:b, :], v[:, k_lo:b, :],
                                    q_pos, k_pos, window, scale, softcap))
    out = outs[0] if len(outs) == 1 else xp.concat(outs, axis=0)  # [end - first_block, H*Dh]
    return out[start - first_block:start - first_block + T, ...]  # [T, H*Dh]


def decode_attention(xp, q, k, v, position, window, scale=None, softcap=None):
    """attention() for the one query q [1, H, Dh] of a decoding step, at `position`: over exactly the
    keys it sees, so that no mask is needed (the shapes still depend on its position alone)."""
    _, H, Dh = q.shape
    Hkv = k.shape[0]
    first = 0 if window is None else max(0, position - window + 1)
    k, v = k[:, first:position + 1, :], v[:, first:position + 1, :]  # [Hkv, S, Dh]
    scale = (1.0 / math.sqrt(Dh)) if scale is None else scale
    q = xp.reshape(q, (Hkv, H // Hkv, Dh)) * scale  # [Hkv, G, Dh]
    scores = q @ xp.matrix_transpose(k)  # [Hkv, G, S]
    if softcap is not None:
        scores = soft_cap(xp, scores, softcap)
    weights = xp.exp(scores - xp.max(scores, axis=-1, keepdims=True))
    out = (weights @ v) / xp.sum(weights, axis=-1, keepdims=True)  # [Hkv, G, Dh]
    return xp.reshape(out, (1, H * Dh))


def attention_block(xp, q, k, v, q_pos, k_pos, window, scale=None, softcap=None):
    """Scaled dot-product attention of queries q [T, H, Dh] over k, v [Hkv, S, Dh], grouped-query style.

    Query head h reads key/value head h // G, so the G query heads of a group are stacked as
    extra rows of one matrix product instead of copying the keys G times. The work here is
    passes over the [T, S] score rows, so two are saved: q is scaled before the product
    (T x Dh values instead of T x S), and the softmax's division by its sum is applied to the
    [T, Dh] output rather than to the [T, S] weights (flash attention normalises the same way).
    """
    T, H, Dh = q.shape
    Hkv, S, _ = k.shape
    G = H // Hkv
    scale = (1.0 / math.sqrt(Dh)) if scale is None else scale
    q = xp.reshape(xp.permute_dims(q, (1, 0, 2)), (Hkv, G * T, Dh)) * scale  # [Hkv, G*T, Dh]
    scores = xp.reshape(q @ xp.matrix_transpose(k), (Hkv, G, T, S))  # [Hkv, G, T, S]
    if softcap is not None:  # Gemma 2: capped before the mask, as transformers does
        scores = soft_cap(xp, scores, softcap)
    visible = k_pos[None, :] <= q_pos[:, None]  # [T, S] causal: never a later position
    if window is not None:
        visible = visible & (q_pos[:, None] - k_pos[None, :] < window)  # only the last `window` keys
    # -inf, not a large negative number: exp(-inf) is exactly 0, so hidden keys get no weight at all.
    scores = xp.where(visible, scores, -math.inf)
    # Softmax, its division postponed: subtract the row maximum so exp never overflows.
    weights = xp.exp(scores - xp.max(scores, axis=-1, keepdims=True))  # [Hkv, G, T, S]
    total = xp.reshape(xp.sum(weights, axis=-1, keepdims=True), (Hkv, G * T, 1))
    out = (xp.reshape(weights, (Hkv, G * T, S)) @ v) / total  # [Hkv, G*T, Dh]
    out = xp.reshape(out, (H, T, Dh))
    return xp.reshape(xp.permute_dims(out, (1, 0, 2)), (T, H * Dh))  # [T, H*Dh]


def attention_weights(xp, q, k, start, window, scale=None, softcap=None):
    """The softmax weights of queries q [T, H, Dh], at positions start..start+T-1, over keys
    k [Hkv, S, Dh] at positions 0..S-1: [H, T, S], zero where a query may not look (a later
    position, or outside its window). Query head h reads key head h // G, as in attention_block.

    The textbook form, for looking inside (refimpl/inspection.py): the same scores as
    attention_block, normalised and kept. Serving never builds this [H, T, S] array.
    """
    T, H, Dh = q.shape
    Hkv, S, _ = k.shape
    scale = (1.0 / math.sqrt(Dh)) if scale is None else scale
    k = xp.repeat(k, H // Hkv, axis=0)  # [H, S, Dh]: each key head once per query head it serves
    scores = (xp.permute_dims(q, (1, 0, 2)) * scale) @ xp.matrix_transpose(k)  # [H, T, S]
    if softcap is not None:
        scores = soft_cap(xp, scores, softcap)
    q_pos, k_pos = xp.arange(start, start + T), xp.arange(S)
    visible = k_pos[None, :] <= q_pos[:, None]  # [T, S]
    if window is not None:
        visible = visible & (q_pos[:, None] - k_pos[None, :] < window)
    scores = xp.where(visible, scores, -math.inf)
    weights = xp.exp(scores - xp.max(scores, axis=-1, keepdims=True))
    return weights / xp.sum(weights, axis=-1, keepdims=True)  # [H, T, S]


# ---------------------------------------------------------------- LayerNorm and GELU (GPT-2 and others)


def layer_norm(xp, x, weight, bias, eps):
    # Unlike RMSNorm, subtract each row's mean first; the variance is the biased one (divide by D),
    # as torch.nn.LayerNorm computes it. Then a learned gain and a learned bias.
    centred = x - xp.mean(x, axis=-1, keepdims=True)  # [N, D]
    return centred * (1.0 / xp.sqrt(xp.mean(centred * centred, axis=-1, keepdims=True) + eps)) * weight + bias


def gelu_tanh(xp, x):
    """GELU with the tanh approximation, x * Phi(x) ~ 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))):
    OpenAI GPT-2's formula, Hugging Face's "gelu_new" (and "gelu_pytorch_tanh")."""
    return 0.5 * x * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


# ---------------------------------------------------------------- soft-capping (Gemma 2)


def soft_cap(xp, x, cap):
    """cap * tanh(x / cap): about x while |x| << cap, never beyond +-cap. Gemma 2 bounds its attention
    scores and its output logits this way so that no single value can dominate a softmax."""
    return cap * xp.tanh(x / cap)


# ---------------------------------------------------------------- mixture of experts (Qwen3-MoE, Mixtral)


def moe_mlp(xp, x, router, gate_up, down, top_k, renormalize, act):
    """A sparse mixture of E gated-MLP experts: each token x [N, D] goes to the top_k experts its
    softmax router scores highest and gets their outputs, weighted by those probabilities.

    router [D, E]; gate_up [E, D, 2F] (each expert's gate and up side by side) and down [E, F, D],
    stored [in, out] like every projection. `renormalize` rescales a token's top_k probabilities
    to sum to 1 (Mixtral; Qwen3-MoE's norm_topk_prob); otherwise they stay shares of all E.

    Each expert runs only on the tokens routed to it: the N*top_k (token, slot) pairs are sorted
    by expert, so expert e reads its tokens as one contiguous block of rows and computes them
    with its weights while they are in the cache, one row at a time (rowwise_matmul: a token's
    bits must not depend on how many others chose the same expert); the outputs are put back in
    pair order and summed per token, slot 0 first, whatever else is in the batch.
    """
    N, D = x.shape
    E, F = gate_up.shape[0], down.shape[1]
    logits = rowwise_matmul(xp, x, router)  # [N, E]
    probs = xp.exp(logits - xp.max(logits, axis=-1, keepdims=True))
    probs = probs / xp.sum(probs, axis=-1, keepdims=True)  # [N, E] softmax over all experts
    # A stable descending sort: on an exact tie the lower expert id comes first.
    chosen = xp.argsort(probs, axis=-1, descending=True, stable=True)[:, :top_k]  # [N, k]
    weights = xp.take_along_axis(probs, chosen, axis=-1)  # [N, k]
    if renormalize:
        weights = weights / xp.sum(weights, axis=-1, keepdims=True)
    pairs = xp.reshape(chosen, (N * top_k,))  # [N*k] the expert of pair (token n, slot j) at n*k + j
    order = xp.argsort(pairs, stable=True)  # [N*k] pair indices, grouped by expert
    h = xp.take(x, order // top_k, axis=0)  # [N*k, D] each pair's token, in that order
    # The loop below slices by Python ints: one small copy of the routing to the host per call.
    counts = np.bincount(to_numpy(pairs), minlength=E)  # [E] how many tokens chose each expert
    outs, lo = [], 0
    for e in range(E):
        n = int(counts[e])
        if n:
            g = rowwise_matmul(xp, h[lo:lo + n, :], gate_up[e, ...])  # [n, 2F]: gate and up side by side
            outs.append(rowwise_matmul(xp, act(xp, g[:, :F]) * g[:, F:], down[e, ...]))  # [n, D]
        lo += n
    y = xp.take(xp.concat(outs, axis=0), xp.argsort(order), axis=0)  # [N*k, D] back in pair order
    return xp.sum(xp.reshape(y, (N, top_k, D)) * weights[:, :, None], axis=1)  # [N, D]
