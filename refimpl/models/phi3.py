"""The Phi-3 family (Microsoft's Phi-3 and Phi-4-mini, model_type "phi3"): token ids in, next-token logits out.

Llama's network, stored and positioned differently. A token meets, in order: its embedding; per
block, RMSNorm -> attention with rotary positions -> residual, RMSNorm -> SwiGLU MLP -> residual;
a final RMSNorm and the output head. What is new next to Llama (refimpl/models/llama.py):

  - Fused projections in the checkpoint: `self_attn.qkv_proj` [(H + 2 Hkv) Dh, D] holds q, k and
    v one above the other, and `mlp.gate_up_proj` [2F, D] holds gate above up (transformers
    splits it with chunk(2): the first half is the gate). No biases anywhere.
  - Partial rotary embeddings: only the first R = int(Dh * partial_rotary_factor) dimensions of
    each head are rotated; the rest pass through unchanged (Phi-4-mini: 0.75).
  - LongRoPE (rope type "longrope"; old configs say "su" or "yarn"): every inverse frequency is
    divided by a per-frequency factor, from `short_factor` for short sequences and `long_factor`
    for long ones, and cos and sin are multiplied by an attention scaling
    sqrt(1 + ln(factor) / ln(original_max_position_embeddings)), factor = max_position_embeddings /
    original_max_position_embeddings, for short and long sequences alike. Which set a sequence
    uses: see `uses_long_factors`.

config.json flags this file reads:

  model_type                        phi3
  hidden_act                        silu only (SwiGLU)
  head_dim                          when present; else hidden_size / num_attention_heads
  rope_parameters / rope_scaling    rope_theta, partial_rotary_factor, and the longrope factors
                                    (short_factor, long_factor, optional factor, attention_factor)
  rope_theta, partial_rotary_factor the classic top-level spellings of the same
  original_max_position_embeddings  the pretraining length (default 4096). As in transformers,
                                    the top-level value wins over one inside rope_scaling.
  max_position_embeddings           the extended context length
  sliding_window                    each token attends to at most this many keys; None: full
  tie_word_embeddings               the output head reuses the token embedding matrix
  resid_pdrop, embd_pdrop, attention_dropout   training only: ignored

Dimension letters as in ops.py: N tokens in this call, D width, H / Hkv heads, Dh head width,
R rotated dimensions of a head, F feed-forward width, V vocabulary, B sequences.
"""

import math
from dataclasses import dataclass

import numpy as np

from refimpl.batching import Batch, attend
from refimpl.config import ConfigError
from refimpl.layout import embed, embedding_and_head, on_device, take_layer, transposed
from refimpl.ops import gated_mlp, linear, rms_norm, rope, rope_cos_sin, rope_inverse_frequencies, silu

MODEL_TYPES = ("phi3",)

LONGROPE_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor", "short_factor", "long_factor",
                 "original_max_position_embeddings", "factor", "attention_factor"}


# ---------------------------------------------------------------- config.json


@dataclass(frozen=True)
class Phi3Config:
    model_type: str
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_hidden_layers: int  # L
    num_attention_heads: int  # H
    num_key_value_heads: int  # Hkv
    head_dim: int  # Dh
    rotary_dim: int  # R: the first R dimensions of each head are rotated
    rms_norm_eps: float
    rope_theta: float
    longrope: dict | None  # short_factor, long_factor, original_max_position_embeddings, attention_factor
    max_position_embeddings: int
    tie_word_embeddings: bool
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_id: int | list | None

    @classmethod
    def from_dict(cls, c):
        if c.get("model_type") not in MODEL_TYPES:
            raise ConfigError(f"model_type {c.get('model_type')!r} is not a Phi-3 type ({', '.join(MODEL_TYPES)})")
        if c.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {c['hidden_act']!r} is not supported (only silu)")
        if len(set(c.get("layer_types") or [])) > 1:
            raise ConfigError("layers of different attention kinds (layer_types) are not supported")
        heads = c["num_attention_heads"]
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        theta, partial, longrope = phi3_rope_parameters(c, c.get("max_position_embeddings", 4096))
        rotary_dim = int(head_dim * partial)
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ConfigError(f"partial_rotary_factor {partial} rotates {rotary_dim} of {head_dim} dimensions: "
                              "only an even number from 2 to head_dim is supported")
        if longrope:
            for key in ("short_factor", "long_factor"):
                if len(longrope[key]) != rotary_dim // 2:
                    raise ConfigError(f"rope_scaling {key} has {len(longrope[key])} values, wanted {rotary_dim // 2}")
        return cls(
            model_type=c["model_type"],
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=c.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rotary_dim=rotary_dim,
            rms_norm_eps=c["rms_norm_eps"],
            rope_theta=theta,
            longrope=longrope,
            max_position_embeddings=c["max_position_embeddings"],
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            sliding_window=c.get("sliding_window"),
            bos_token_id=c.get("bos_token_id"),
            eos_token_id=c.get("eos_token_id"),
        )


Config = Phi3Config  # the name the registry (models/__init__.py) looks for


def phi3_rope_parameters(c, max_positions):
    """rope_theta, partial_rotary_factor, and the longrope parameters (or None), read as transformers'
    Phi3Config reads them: an old `rope_scaling` dict replaces `rope_parameters` wholesale; theta
    and the partial factor fall back to their top-level keys."""
    params = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
    partial = float(params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("su", "yarn"):  # Phi-3's early names for LongRoPE; transformers maps both to it
        rope_type = "longrope"
    if rope_type == "default":
        return theta, partial, None
    if rope_type != "longrope":
        raise ConfigError(f"rope scaling {rope_type!r} is not supported for phi3 (supported: default, longrope)")
    unknown = set(params) - LONGROPE_KEYS
    if unknown:
        raise ConfigError(f"rope_scaling keys {sorted(unknown)} are not supported")
    # transformers' Phi3Config has its own `original_max_position_embeddings` (default 4096) and
    # copies it over whatever rope_scaling says.
    original = c.get("original_max_position_embeddings", 4096)
    factor = params.get("factor") or max_positions / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:  # LongRoPE's paper: keep the attention's entropy as the context grows
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return theta, partial, {"short_factor": tuple(params["short_factor"]), "long_factor": tuple(params["long_factor"]),
                            "original_max_position_embeddings": original, "attention_factor": float(attention_factor)}


def longrope_inverse_frequencies(theta, rotary_dim, factors):
    """LongRoPE's inverse frequencies 1 / (factor_i * theta^(2i/R)), one rescaling factor per frequency.

    float32 steps in transformers' order (the exponent, then the product, then the reciprocal);
    theta's power is taken in float64 and rounded once, as in ops.rope_inverse_frequencies.
    """
    exponent = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)  # [R/2]
    power = (theta ** exponent.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / (np.asarray(factors, dtype=np.float32) * power)).astype(np.float32)  # [R/2]


def uses_long_factors(cfg, capacity):
    """Whether a sequence whose KV cache holds `capacity` positions rotates with LongRoPE's long factors.

    transformers decides per forward call: long when that call's last position is beyond
    original_max_position_embeddings. A sequence that grows past it while decoding then keeps the
    keys of its earlier positions rotated with the short factors (its generate() recomputes the
    whole cache at that step instead). refimpl decides once per sequence, by the most positions it
    may reach (prompt + max new tokens, its cache's capacity), so every key of a sequence is
    rotated the same way and cached decoding equals a full pass. Where the sequence never crosses
    the boundary the two rules agree: a full pass over T tokens (capacity T), and a generation
    whose prompt is already long or whose whole length stays short.
    """
    return capacity > cfg.longrope["original_max_position_embeddings"]


def cache_kind(cfg, capacity):
    """What a cache's keys depend on besides position (models/__init__.py): the factors they were
    rotated with. The engine copies a cached prompt prefix only into a cache of the same kind."""
    return "long" if cfg.longrope is not None and uses_long_factors(cfg, capacity) else "short"


# ---------------------------------------------------------------- the checkpoint


def expected_shapes(cfg):
    """Every tensor name the config implies, with its shape (Hugging Face's names and layout)."""
    D, F, V, Dh = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    layer = {
        "input_layernorm.weight": (D,),
        "self_attn.qkv_proj.weight": ((H + 2 * Hkv) * Dh, D),  # q, then k, then v
        "self_attn.o_proj.weight": (D, H * Dh),
        "post_attention_layernorm.weight": (D,),
        "mlp.gate_up_proj.weight": (2 * F, D),  # gate, then up
        "mlp.down_proj.weight": (D, F),
    }
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(cfg.num_hidden_layers):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in layer.items()}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


@dataclass
class Phi3Weights:
    embed_tokens: object  # [V, D]; None when tied: then token t's embedding is lm_head[:, t]
    layers: list  # one dict per block: "self_attn.qkv_proj.weight" -> [D, (H + 2 Hkv) Dh], ...
    norm: object  # [D]
    lm_head: object  # [D, V], transposed like every projection
    inv_freq: object  # [R/2] RoPE inverse frequencies (LongRoPE: with the short factors)
    long_inv_freq: object  # [R/2] with LongRoPE's long factors; None without LongRoPE


def load_weights(tensors, cfg, xp):
    """The checked checkpoint tensors (name -> NumPy array, see weights.py), arranged and on the device.

    The checkpoint already fuses q/k/v and gate/up, so the only rearranging is a transpose of every
    matrix to [in, out], so that `x @ W` is a plain row-major product (as in llama.py).
    """
    layers = [on_device(xp, transposed(take_layer(tensors, i))) for i in range(cfg.num_hidden_layers)]
    embed, lm_head = embedding_and_head(xp, tensors, cfg.tie_word_embeddings)
    if cfg.longrope:
        inv_freq = longrope_inverse_frequencies(cfg.rope_theta, cfg.rotary_dim, cfg.longrope["short_factor"])
        long_inv_freq = xp.asarray(longrope_inverse_frequencies(cfg.rope_theta, cfg.rotary_dim, cfg.longrope["long_factor"]))
    else:
        inv_freq, long_inv_freq = rope_inverse_frequencies(cfg.rope_theta, cfg.rotary_dim), None
    return Phi3Weights(embed, layers, xp.asarray(tensors.pop("model.norm.weight")), lm_head,
                       xp.asarray(inv_freq), long_inv_freq)


# ---------------------------------------------------------------- importing GGUF (refimpl/gguf_import.py)

# GGUF tensor name -> HF tensor name. Per-block names are "blk.{i}." + key. llama.cpp's converter
# (Phi3MiniModel) renames the fused tensors and changes nothing else: attn_qkv is q, k, v one above
# the other, and ffn_up is gate above up, the order llama.cpp's fused SwiGLU splits it in too.
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_up.weight": "mlp.gate_up_proj.weight",  # gate, then up
    "ffn_down.weight": "mlp.down_proj.weight",
}
# LongRoPE's per-frequency factors [R/2]: config values, which the converter stores as tensors
# because a GGUF key holds no float list that llama.cpp's graph can read. They go back to
# rope_scaling, not to model.safetensors.
ROPE_FACTORS = {"rope_factors_short.weight": "short_factor", "rope_factors_long.weight": "long_factor"}


def gguf_config(meta, tensor_names):
    """config.json as HF's Phi3Config writes it, from a GGUF file's metadata (arch "phi3")."""
    hidden, heads = meta["phi3.embedding_length"], meta["phi3.attention.head_count"]
    head_dim = hidden // heads  # the converter writes no head width: Phi3Config's default
    # rope.dimension_count is R = int(partial_rotary_factor * hidden) // heads; R / Dh gives the factor back.
    rotary_dim = meta.get("phi3.rope.dimension_count", head_dim)
    partial = rotary_dim / head_dim
    if int(head_dim * partial) != rotary_dim:
        raise ValueError(f"phi3.rope.dimension_count {rotary_dim} is no partial_rotary_factor of head width {head_dim}")
    original = meta.get("phi3.rope.scaling.original_context_length", 4096)
    config = {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "hidden_size": hidden,
        "intermediate_size": meta["phi3.feed_forward_length"],
        "num_hidden_layers": meta["phi3.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get("phi3.attention.head_count_kv", heads),
        "vocab_size": meta.get("phi3.vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "rms_norm_eps": meta["phi3.attention.layer_norm_rms_epsilon"],
        "rope_theta": meta.get("phi3.rope.freq_base", 10000.0),
        "partial_rotary_factor": partial,
        "max_position_embeddings": meta["phi3.context_length"],
        "original_max_position_embeddings": original,
        # The converter writes 0 for "no sliding window" (Phi-4-mini) and the width otherwise.
        "sliding_window": meta.get("phi3.attention.sliding_window") or None,
        # Without a separate output matrix the logits reuse the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if "tokenizer.ggml.padding_token_id" in meta:
        config["pad_token_id"] = meta["tokenizer.ggml.padding_token_id"]
    if set(ROPE_FACTORS) & set(tensor_names):
        # The factor tensors mark a LongRoPE model (the converter writes no rope.scaling.type for
        # phi3); gguf_tensors fills in the two lists when it meets them.
        config["rope_scaling"] = {"rope_type": "longrope", "original_max_position_embeddings": original}
        attn_factor = meta.get("phi3.rope.scaling.attn_factor")
        factor = config["max_position_embeddings"] / original
        default = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1.0 else 1.0
        if attn_factor is not None and np.float32(attn_factor) != np.float32(default):
            # The converter's "yarn" scale (0.1 ln s + 1) differs from LongRoPE's: keep the file's.
            config["rope_scaling"]["attention_factor"] = attn_factor
    return config


def hf_name(gguf_name):
    """The HF name of a GGUF tensor; an error that names it if we do not know it."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    prefix, _, rest = gguf_name.partition(".")
    block, _, key = rest.partition(".")
    if prefix == "blk" and block.isdigit() and key in BLOCK_NAMES:
        return f"model.layers.{block}.{BLOCK_NAMES[key]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Phi-3 counterpart in the HF layout")


def gguf_tensors(gguf_name, w, config):
    """The HF tensor of one dequantized GGUF tensor, renamed; LongRoPE's factors go to config instead."""
    if gguf_name in ROPE_FACTORS:
        # float32 in the file: keep the shortest decimal that rounds to the same float32 (1.1,
        # not 1.100000023841858), as the original config.json spelled it.
        config["rope_scaling"][ROPE_FACTORS[gguf_name]] = [float(str(f)) for f in w.astype(np.float32)]
        return
    yield hf_name(gguf_name), w


# ---------------------------------------------------------------- the forward pass


def rotation(xp, cfg, W, tokens, caches):
    """cos and sin [N, 1, R] of every new token's rotation: each sequence at its own positions,
    with its own LongRoPE factors (uses_long_factors), scaled by LongRoPE's attention factor."""
    cos, sin = [], []
    for ids, cache in zip(tokens, caches, strict=True):
        long = cfg.longrope is not None and uses_long_factors(cfg, cache.capacity)
        positions = xp.arange(cache.length, cache.length + len(ids))  # [T]
        c, s = rope_cos_sin(xp, W.long_inv_freq if long else W.inv_freq, positions)  # [T, 1, R] each
        cos.append(c)
        sin.append(s)
    cos, sin = (cos[0], sin[0]) if len(cos) == 1 else (xp.concat(cos, axis=0), xp.concat(sin, axis=0))
    if cfg.longrope is not None:
        # Scaling cos and sin scales q . k by attention_factor^2: sharper attention over a longer context.
        scale = cfg.longrope["attention_factor"]
        cos, sin = cos * scale, sin * scale
    return cos, sin


def partial_rope(xp, x, cos, sin):
    """Rotate the first R dimensions of each head of x [N, H, Dh]; the other Dh - R pass unchanged."""
    R = cos.shape[-1]
    if R == x.shape[-1]:
        return rope(xp, x, cos, sin)
    return xp.concat([rope(xp, x[..., :R], cos, sin), x[..., R:]], axis=-1)  # [N, H, Dh]


def self_attention(xp, cfg, w, layer, x, cos, sin, batch):
    """Project to q, k, v (one fused matrix), rotate q and k by position, attend, project back."""
    N, H, Hkv, Dh = x.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv = linear(batch, x, w, "self_attn.qkv_proj", False)  # [N, (H + 2 Hkv) Dh]: q, k, v side by side
    q = xp.reshape(qkv[:, :H * Dh], (N, H, Dh))
    k = xp.reshape(qkv[:, H * Dh:(H + Hkv) * Dh], (N, Hkv, Dh))
    v = xp.reshape(qkv[:, (H + Hkv) * Dh:], (N, Hkv, Dh))
    q, k = partial_rope(xp, q, cos, sin), partial_rope(xp, k, cos, sin)
    out = attend(xp, batch, layer, q, k, v, cfg.sliding_window)  # [N, H*Dh]
    return linear(batch, out, w, "self_attn.o_proj", False)  # [N, D]


def block(xp, cfg, w, layer, x, cos, sin, batch):
    """One transformer block with pre-normalisation and residual connections (dropout: training only)."""
    x = x + self_attention(xp, cfg, w, layer, rms_norm(xp, x, w["input_layernorm.weight"], cfg.rms_norm_eps),
                           cos, sin, batch)
    h = rms_norm(xp, x, w["post_attention_layernorm.weight"], cfg.rms_norm_eps)
    return x + gated_mlp(xp, batch, w, h, cfg.intermediate_size, False, silu)  # SwiGLU: gate first, then up


def forward(model, tokens, caches, all_logits=False):
    """Run new tokens of one or more sequences through the model, extending their caches.

    tokens: one list of token ids per sequence; caches: that sequence's KVCache, whose `length`
    says how many positions came before. Returns logits [B, V] for the last token of each
    sequence, or [N, V] for every token when `all_logits` (scoring a prompt); a list of bools
    asks per sequence, rows in sequence order (Batch.logits).
    """
    xp, cfg, W = model.xp, model.config, model.weights
    cos, sin = rotation(xp, cfg, W, tokens, caches)  # before the caches advance
    batch = Batch.of(xp, tokens, caches)

    x = embed(xp, W.embed_tokens, W.lm_head, batch.ids)  # [N, D]
    batch.record(0, x)  # the residual stream before the blocks, kept only by an inspected sequence (inspection.py)
    for layer, w in enumerate(W.layers):
        x = block(xp, cfg, w, layer, x, cos, sin, batch)
        batch.record(layer + 1, x)  # and after each block
    batch.advance()

    # Each sequence's last position predicts its next token; scoring a prompt wants every position's.
    return batch.logits(rms_norm(xp, x, W.norm, cfg.rms_norm_eps), W.lm_head, all_logits)  # [B, V] or [N, V]


def output_logits(model, x):
    """The final norm and the output head on residual-stream rows x [N, D]: logits [N, V], what the
    model would predict if the blocks ended there. forward applies the same steps to the rows that
    predict (Batch.logits); the logit lens (inspection.py) applies them to every layer's rows."""
    xp, cfg, W = model.xp, model.config, model.weights
    return rms_norm(xp, x, W.norm, cfg.rms_norm_eps) @ W.lm_head  # [N, V]
