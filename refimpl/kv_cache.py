"""The key/value cache of one sequence.

Attention at position t needs the keys and values of every earlier position. Recomputing them at
each step would make decoding quadratic, so each block writes its keys (after RoPE) and values
here, at the explicit positions of the tokens being processed, and reads back the prefix.

The arrays are preallocated for `capacity` positions (rounded up to whole key blocks, which
attention reads: see ops.KEY_BLOCK), so a step never reallocates or copies the past: it writes
T new rows and reads views.

Shapes: L blocks, Hkv key/value heads, C capacity, Dh head width, T new tokens.
"""

from refimpl.ops import KEY_BLOCK


class CacheFullError(ValueError):
    """More positions were written than the cache was allocated for."""


class KVCache:
    def __init__(self, xp, config, capacity, prompt_length=None):
        blocks = -(-capacity // KEY_BLOCK)
        shape = (config.num_hidden_layers, config.num_key_value_heads, blocks * KEY_BLOCK, config.head_dim)
        self.k = xp.zeros(shape, dtype=xp.float32)  # [L, Hkv, C, Dh]
        self.v = xp.zeros(shape, dtype=xp.float32)  # [L, Hkv, C, Dh]
        self.capacity = capacity
        self.length = 0  # positions [0, length) hold valid keys and values
        # Positions from here on hold generated tokens, which batching.py multiplies one row at a
        # time; the prompt's rows go in tiles. None: every position is a prompt's (scoring).
        self.prompt_length = prompt_length
        # What the stored keys depend on besides their positions, when the family says (Phi-3's
        # LongRoPE rotates a sequence by its capacity): caches of different kinds share no prefix.
        self.kind = None
        # An inspection.Probe that records what the model computes for this sequence (its residual
        # stream and attention weights), or None: serving never sets one.
        self.probe = None

    def decodes(self, position):
        """Whether the token at `position` is a generated one (batching.py multiplies its row alone)."""
        return self.prompt_length is not None and position >= self.prompt_length

    def write(self, xp, layer, start, k, v):
        """Store k, v [T, Hkv, Dh] at positions start..start+T-1; return the layer's keys and values
        [Hkv, C, Dh] (the positions from start + T on are not this sequence's yet)."""
        stop = start + k.shape[0]
        if stop > self.capacity:
            raise CacheFullError(f"KV cache holds {self.capacity} positions, {stop} were asked for")
        self.k[layer, :, start:stop, :] = xp.permute_dims(k, (1, 0, 2))  # [T, Hkv, Dh] -> [Hkv, T, Dh]
        self.v[layer, :, start:stop, :] = xp.permute_dims(v, (1, 0, 2))
        return self.k[layer, ...], self.v[layer, ...]  # [Hkv, C, Dh] each

    def copy_prefix(self, xp, source, n):
        """Take the first n positions of another sequence's cache (a shared prompt prefix, or the
        whole prompt when n > 1 choices continue it): only filled positions are copied."""
        self.k[:, :, :n, :] = source.k[:, :, :n, :]
        self.v[:, :, :n, :] = source.v[:, :, :n, :]
        self.length = n
