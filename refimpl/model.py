"""The Llama-family transformer forward pass: token ids in, next-token logits out.

One function per equation, in the order a token meets them: embed, then for each block
RMSNorm -> attention with RoPE -> residual, RMSNorm -> SwiGLU MLP -> residual, then a final
RMSNorm and the output head. The flags that tell the architectures apart (qkv_bias, o_bias,
mlp_bias, tie_word_embeddings, sliding_window, rope_scaling) come from config.json; see config.py.

Several sequences can share one call: their tokens are stacked into one [N, D] matrix, so every
weight is read once per step for all of them, while attention runs per sequence against that
sequence's own KV cache. A single sequence is simply a batch of one.

Dimension letters: N tokens in this call (all sequences), T tokens of one sequence, S keys
(cached + new), D model width, H query heads, Hkv key/value heads, G = H / Hkv, Dh head width,
F feed-forward width, V vocabulary, B sequences.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refimpl.config import ModelConfig
from refimpl.kv_cache import KVCache
from refimpl.weights import load_weights
from refimpl.xp import keep_freed_memory, namespace


@dataclass
class Model:
    config: ModelConfig
    weights: object  # weights.Weights
    xp: object  # the array namespace
    inv_freq: object  # [Dh/2] RoPE inverse frequencies

    def new_cache(self, capacity):
        return KVCache(self.xp, self.config, capacity)


def load_model(path, device="cpu", xp=None):
    """Load config.json and the safetensors weights of an HF-layout directory.

    `device` picks the array namespace; `xp` overrides it (the tests pass array_api_strict).
    """
    xp = xp or namespace(device)
    if device == "cpu":
        keep_freed_memory()  # a CPU forward pass reuses large short-lived arrays (see xp.py)
    config = ModelConfig.from_dir(path)
    weights = load_weights(Path(path), config, xp)
    return Model(config, weights, xp, xp.asarray(rope_inverse_frequencies(config)))


def rope_inverse_frequencies(cfg):
    """RoPE's per-pair rotation speeds theta^(-2i/Dh), with llama3 rescaling when configured.

    The exponent 2i/Dh is float32, as in transformers; the power and reciprocal are float64,
    rounded once to float32, so each value is correctly rounded (unless a float64 error straddles
    a float32 rounding boundary, odds ~1e-8) and the same on every CPU. A float32 pow is not:
    its last bits depend on the SIMD path. transformers' float32 values are within 2 ULP of these
    (the llama3 blend below, the same float32 steps in both, can magnify that to 4 ULP).
    """
    dim = cfg.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)  # [Dh/2]
    inv_freq = (1.0 / cfg.rope_theta ** exponent.astype(np.float64)).astype(np.float32)
    s = cfg.rope_scaling
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


def rms_norm(xp, x, weight, eps):
    # Scale each row to unit root-mean-square, then by a learned gain: no mean, no bias.
    return x * (1.0 / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps)) * weight  # [N, D]


def linear(x, w, name, bias):
    """x @ W (+ b): the weight named `name`, stored [in, out] (weights.arrange_layer)."""
    y = x @ w[name + ".weight"]
    return y + w[name + ".bias"] if bias else y


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


# Queries are attended in blocks of this many rows: the [H, T, S] score matrix of a long prompt
# would not fit in memory (8192 tokens: 2.4 GB per layer), and each block skips the keys after
# its last query, which the causal mask would hide anyway.
QUERY_BLOCK = 128


def attention(xp, q, k, v, start, window):
    """Causal attention of one sequence's queries q [T, H, Dh], at positions start..start+T-1,
    over its keys and values k, v [Hkv, S, Dh] at positions 0..S-1 (S = start + T)."""
    T = q.shape[0]
    outs = []
    for i in range(0, T, QUERY_BLOCK):
        j = min(i + QUERY_BLOCK, T)
        k_lo = 0 if window is None else max(0, start + i - window + 1)  # first key any query here sees
        k_hi = start + j  # one past the last key the last query here sees
        q_pos, k_pos = xp.arange(start + i, start + j), xp.arange(k_lo, k_hi)
        outs.append(attention_block(xp, q[i:j, ...], k[:, k_lo:k_hi, :], v[:, k_lo:k_hi, :], q_pos, k_pos, window))
    return outs[0] if len(outs) == 1 else xp.concat(outs, axis=0)  # [T, H*Dh]


def attention_block(xp, q, k, v, q_pos, k_pos, window):
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
    q = xp.reshape(xp.permute_dims(q, (1, 0, 2)), (Hkv, G * T, Dh)) * (1.0 / math.sqrt(Dh))  # [Hkv, G*T, Dh]
    scores = xp.reshape(q @ xp.matrix_transpose(k), (Hkv, G, T, S))  # [Hkv, G, T, S]
    if T > 1:  # a single query (decoding) sees every key of its slice: attention() cut it so
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


def self_attention(xp, cfg, w, layer, x, cos, sin, spans):
    """Project to q, k, v, rotate, write k/v to each sequence's cache, attend, project back."""
    N, H, Hkv, Dh = x.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv = linear(x, w, "self_attn.qkv_proj", cfg.qkv_bias)  # [N, (H + 2 Hkv) Dh]: q, k, v side by side
    q = xp.reshape(qkv[:, :H * Dh], (N, H, Dh))
    k = xp.reshape(qkv[:, H * Dh:(H + Hkv) * Dh], (N, Hkv, Dh))
    v = xp.reshape(qkv[:, (H + Hkv) * Dh:], (N, Hkv, Dh))
    q, k = rope(xp, q, cos, sin), rope(xp, k, cos, sin)
    # Rows lo..hi-1 belong to the sequence whose cache this is; each writes its new keys and values.
    kv = [cache.write(xp, layer, cache.length, k[lo:hi, ...], v[lo:hi, ...]) for lo, hi, cache in spans]
    if len(spans) > 1 and N == len(spans):  # every sequence decodes one token: one batched attention
        out = decode_attention(xp, q, [keys for keys, _ in kv], [values for _, values in kv], cfg.sliding_window)
    else:
        outs = [attention(xp, q[lo:hi, ...], keys, values, cache.length, cfg.sliding_window)
                for (lo, hi, cache), (keys, values) in zip(spans, kv)]
        out = outs[0] if len(outs) == 1 else xp.concat(outs, axis=0)  # [N, H*Dh]
    return linear(out, w, "self_attn.o_proj", cfg.o_bias)  # [N, D]


def decode_attention(xp, q, keys, values, window):
    """Attention for B sequences that each decode one token, as one batch instead of B small ones.

    q [B, H, Dh]; keys[b], values[b] [Hkv, S_b, Dh] hold sequence b's keys up to and including
    the new token's. They are copied into one zero-padded [B, Hkv, S, Dh] pair and the padding
    is masked with -inf, so three batched products serve all B sequences (attention_block's
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
    q = xp.reshape(q, (B, Hkv, G, Dh)) * (1.0 / math.sqrt(Dh))
    scores = q @ xp.matrix_transpose(K)  # [B, Hkv, G, S]
    real = xp.arange(S)[None, :] < xp.asarray(lengths)[:, None]  # [B, S]: not padding
    scores = xp.where(real[:, None, None, :], scores, -math.inf)
    weights = xp.exp(scores - xp.max(scores, axis=-1, keepdims=True))
    out = (weights @ V) / xp.sum(weights, axis=-1, keepdims=True)  # [B, Hkv, G, Dh]
    return xp.reshape(out, (B, H * Dh))


def silu(xp, x):
    return x / (1.0 + xp.exp(-x))


def mlp(xp, cfg, w, x):
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    F = cfg.intermediate_size
    gate_up = linear(x, w, "mlp.gate_up_proj", cfg.mlp_bias)  # [N, 2F]: gate, up side by side
    return linear(silu(xp, gate_up[:, :F]) * gate_up[:, F:], w, "mlp.down_proj", cfg.mlp_bias)  # [N, D]


def block(xp, cfg, w, layer, x, cos, sin, spans):
    """One transformer block with pre-normalisation and residual connections."""
    x = x + self_attention(xp, cfg, w, layer, rms_norm(xp, x, w["input_layernorm.weight"], cfg.rms_norm_eps),
                           cos, sin, spans)
    return x + mlp(xp, cfg, w, rms_norm(xp, x, w["post_attention_layernorm.weight"], cfg.rms_norm_eps))


def embed(xp, W, ids):
    """The embedding rows of token ids [N] -> [N, D]; a tied model reads them as columns of the head."""
    if W.embed_tokens is None:
        return xp.permute_dims(xp.take(W.lm_head, ids, axis=1), (1, 0))
    return xp.take(W.embed_tokens, ids, axis=0)


def forward(model, tokens, caches, all_logits=False):
    """Run new tokens of one or more sequences through the model, extending their caches.

    tokens: one list of token ids per sequence; caches: that sequence's KVCache, whose `length`
    says how many positions came before. Returns logits [B, V] for the last token of each
    sequence, or [N, V] for every token when `all_logits` (scoring a prompt).
    """
    xp, cfg, W = model.xp, model.config, model.weights
    spans, positions, lo = [], [], 0
    for ids, cache in zip(tokens, caches, strict=True):
        spans.append((lo, lo + len(ids), cache))
        positions.append(xp.arange(cache.length, cache.length + len(ids)))
        lo += len(ids)
    positions = positions[0] if len(positions) == 1 else xp.concat(positions)  # [N]
    ids = xp.asarray([t for seq in tokens for t in seq], dtype=xp.int64)  # [N]
    cos, sin = rope_cos_sin(xp, model.inv_freq, positions)

    x = embed(xp, W, ids)  # [N, D]
    for layer, w in enumerate(W.layers):
        x = block(xp, cfg, w, layer, x, cos, sin, spans)
    for lo, hi, cache in spans:
        cache.length += hi - lo

    if not all_logits:  # only the last position of each sequence predicts its next token
        x = xp.take(x, xp.asarray([hi - 1 for _, hi, _ in spans]), axis=0)  # [B, D]
    x = rms_norm(xp, x, W.norm, cfg.rms_norm_eps)
    return x @ W.lm_head  # [B, V] or [N, V]

