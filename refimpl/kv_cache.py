"""The key/value cache of one sequence.

Attention at position t needs the keys and values of every earlier position. Recomputing them at
each step would make decoding quadratic, so each block writes its keys (after RoPE) and values
here, at the explicit positions of the tokens being processed, and reads back the prefix.

The arrays are preallocated for `capacity` positions, so a step never reallocates or copies the
past: it writes T new rows and reads a view of the first `length + T`.

Shapes: L blocks, Hkv key/value heads, C capacity, Dh head width, T new tokens.
"""


class CacheFullError(ValueError):
    """More positions were written than the cache was allocated for."""


class KVCache:
    def __init__(self, xp, config, capacity):
        shape = (config.num_hidden_layers, config.num_key_value_heads, capacity, config.head_dim)
        self.k = xp.zeros(shape, dtype=xp.float32)  # [L, Hkv, C, Dh]
        self.v = xp.zeros(shape, dtype=xp.float32)  # [L, Hkv, C, Dh]
        self.capacity = capacity
        self.length = 0  # positions [0, length) hold valid keys and values
        # What the stored keys depend on besides their positions, when the family says (Phi-3's
        # LongRoPE rotates a sequence by its capacity): caches of different kinds share no prefix.
        self.kind = None

    def write(self, xp, layer, start, k, v):
        """Store k, v [T, Hkv, Dh] at positions start..start+T-1; return all keys/values up to there."""
        stop = start + k.shape[0]
        if stop > self.capacity:
            raise CacheFullError(f"KV cache holds {self.capacity} positions, {stop} were asked for")
        self.k[layer, :, start:stop, :] = xp.permute_dims(k, (1, 0, 2))  # [T, Hkv, Dh] -> [Hkv, T, Dh]
        self.v[layer, :, start:stop, :] = xp.permute_dims(v, (1, 0, 2))
        return self.k[layer, :, :stop, :], self.v[layer, :, :stop, :]  # [Hkv, S, Dh] each

    def copy_prefix(self, xp, source, n):
        """Take the first n positions of another sequence's cache (a shared prompt prefix, or the
        whole prompt when n > 1 choices continue it): only filled positions are copied."""
        self.k[:, :, :n, :] = source.k[:, :, :n, :]
        self.v[:, :, :n, :] = source.v[:, :, :n, :]
        self.length = n
