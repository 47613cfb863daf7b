"""The Gemma family (Gemma 2, Gemma 3 text): token ids in, next-token logits out.

A token meets, in order: its embedding, scaled by sqrt(D); per block, RMSNorm -> attention ->
RMSNorm -> residual, RMSNorm -> GeGLU MLP -> RMSNorm -> residual (a norm before *and* after
each half); a final RMSNorm, the output head, and a soft cap on the logits. Gemma 3 is Gemma 2's
network plus a per-head RMSNorm of q and k, and its own RoPE speeds for local and global layers.

What is new against Llama:
  - RMSNorm multiplies by (1 + w): checkpoints store the gain minus one (load_weights adds it).
  - Embeddings are multiplied by sqrt(D), rounded to float32 first, as transformers does.
  - The MLP is gated by tanh-approximated GELU (GeGLU) instead of SiLU.
  - Scores are scaled by query_pre_attn_scalar^-1/2, not head_dim^-1/2; head_dim is its own setting.
  - Soft-capping, cap * tanh(x / cap): of the attention scores (Gemma 2) and of the output logits.
  - Layers alternate between sliding-window ("local") and full ("global") attention.

Config flags read from config.json:
  model_type               gemma2 | gemma3_text
  hidden_activation        must be gelu_pytorch_tanh
  head_dim                 Dh, independent of hidden_size / num_attention_heads
  query_pre_attn_scalar    scores are multiplied by query_pre_attn_scalar ** -0.5
  attn_logit_softcapping   cap on the attention scores (Gemma 2; None: no cap). transformers'
                           Gemma 3 ignores it, so a Gemma 3 config that sets it is refused
  final_logit_softcapping  cap on the output logits (None: no cap)
  layer_types              "sliding_attention" | "full_attention" per layer (older configs: Gemma 2
                           alternates, starting local; Gemma 3 has a global layer every
                           sliding_window_pattern-th layer)
  sliding_window           how many keys (the query's own included) a local layer's query sees
  rope_parameters          Gemma 2: one RoPE for all layers. Gemma 3: one per layer type, or the
                           older keys rope_theta + rope_scaling (global) and rope_local_base_freq
                           (local). Types: default, linear (inverse frequencies / factor)
  tie_word_embeddings      the output head reuses the token embedding matrix (Gemma's default)
Refused by name: attention_bias, use_bidirectional_attention, partial rotary, other rope types.

Dimension letters as in ops.py: N tokens in this call, D width, H / Hkv heads, Dh head width,
F feed-forward width, V vocabulary, B sequences.
"""

import math
from dataclasses import dataclass

import numpy as np

from refimpl import layout
from refimpl.batching import Batch, attend
from refimpl.config import ConfigError
from refimpl.layout import embedding_and_head, on_device, stacked, take_layer, transposed
from refimpl.ops import gated_mlp, gelu_tanh, linear, rms_norm, rope, rope_cos_sin, rope_inverse_frequencies, soft_cap

MODEL_TYPES = ("gemma2", "gemma3_text")
LAYER_TYPES = ("sliding_attention", "full_attention")


# ---------------------------------------------------------------- config.json


@dataclass(frozen=True)
class GemmaConfig:
    model_type: str
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_hidden_layers: int  # L
    num_attention_heads: int  # H
    num_key_value_heads: int  # Hkv
    head_dim: int  # Dh
    rms_norm_eps: float
    query_pre_attn_scalar: float
    attn_logit_softcapping: float | None
    final_logit_softcapping: float | None
    layer_types: tuple  # one of LAYER_TYPES per layer
    sliding_window: int | None
    rope: dict  # layer type -> (rope_theta, linear scaling factor or None)
    qk_norm: bool  # Gemma 3: RMSNorm of each query and key head before RoPE
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | list | None

    @classmethod
    def from_dict(cls, c):
        model_type = c.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {model_type!r} is not a Gemma-family type ({', '.join(MODEL_TYPES)})")
        activation = c.get("hidden_activation", "gelu_pytorch_tanh")  # transformers' Gemma reads this, not hidden_act
        if activation != "gelu_pytorch_tanh":
            raise ConfigError(f"hidden_activation {activation!r} is not supported (only gelu_pytorch_tanh)")
        for flag in ("attention_bias", "use_bidirectional_attention"):
            if c.get(flag):
                raise ConfigError(f"{flag} is not supported")
        gemma3 = model_type == "gemma3_text"
        # transformers' defaults when a key is missing: Gemma 2 caps scores at 50 and logits at 30.
        attn_cap = c.get("attn_logit_softcapping", None if gemma3 else 50.0)
        if gemma3 and attn_cap is not None:
            raise ConfigError("attn_logit_softcapping with gemma3_text is not supported (transformers ignores it)")
        L = c["num_hidden_layers"]
        return cls(
            model_type=model_type,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_hidden_layers=L,
            num_attention_heads=c["num_attention_heads"],
            num_key_value_heads=c["num_key_value_heads"],
            head_dim=c.get("head_dim", 256),
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            query_pre_attn_scalar=c.get("query_pre_attn_scalar", 256),
            attn_logit_softcapping=attn_cap,
            final_logit_softcapping=c.get("final_logit_softcapping", None if gemma3 else 30.0),
            layer_types=layer_types(c, gemma3, L),
            sliding_window=c.get("sliding_window", 4096),
            rope=rope_by_layer_type(c, gemma3),
            qk_norm=gemma3,
            max_position_embeddings=c.get("max_position_embeddings", 131072 if gemma3 else 8192),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
            bos_token_id=c.get("bos_token_id"),
            eos_token_id=c.get("eos_token_id"),
        )


Config = GemmaConfig  # the name the registry (models/__init__.py) looks for


def layer_types(c, gemma3, L):
    """Each layer's attention kind: local (sliding window) or global (full causal)."""
    types = c.get("layer_types")
    if types is None:  # configs written before transformers had layer_types: the fixed patterns
        every = c.get("sliding_window_pattern", 6) if gemma3 else 2
        types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(L)]
    if len(types) != L or not set(types) <= set(LAYER_TYPES):
        raise ConfigError(f"layer_types {types} must name one of {LAYER_TYPES} for each of the {L} layers")
    return tuple(types)


def rope_by_layer_type(c, gemma3):
    """{layer type: (rope_theta, linear factor or None)}: Gemma 2 has one RoPE for all layers;
    Gemma 3 turns its local layers slower or faster than its global ones, and may stretch only
    the global ones (long context)."""
    params = c.get("rope_parameters") or {}
    if not gemma3:
        one = {"rope_theta": c.get("rope_theta", 10000.0), **params, **(c.get("rope_scaling") or {})}
        kinds = {"sliding_attention": one, "full_attention": one}
    elif "full_attention" in params:  # transformers 5: one dict per layer type
        kinds = {kind: params[kind] for kind in LAYER_TYPES}
    else:  # transformers 4's keys (and its defaults)
        kinds = {"sliding_attention": {"rope_theta": c.get("rope_local_base_freq", 10000.0)},
                 "full_attention": {"rope_theta": c.get("rope_theta", 1000000.0), **(c.get("rope_scaling") or {})}}
    rope = {}
    for kind, p in kinds.items():
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type not in ("default", "linear"):
            raise ConfigError(f"rope type {rope_type!r} ({kind}) is not supported (supported: default, linear)")
        if p.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(f"partial_rotary_factor {p['partial_rotary_factor']} is not supported")
        rope[kind] = (float(p["rope_theta"]), float(p["factor"]) if rope_type == "linear" else None)
    return rope


# ---------------------------------------------------------------- the checkpoint


def expected_shapes(cfg):
    """Every tensor name the config implies, with its shape (Hugging Face's names and layout)."""
    D, F, V, Dh = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    layer = {
        "input_layernorm.weight": (D,),
        "self_attn.q_proj.weight": (H * Dh, D),
        "self_attn.k_proj.weight": (Hkv * Dh, D),
        "self_attn.v_proj.weight": (Hkv * Dh, D),
        "self_attn.o_proj.weight": (D, H * Dh),
        "post_attention_layernorm.weight": (D,),
        "pre_feedforward_layernorm.weight": (D,),
        "mlp.gate_proj.weight": (F, D),
        "mlp.up_proj.weight": (F, D),
        "mlp.down_proj.weight": (D, F),
        "post_feedforward_layernorm.weight": (D,),
    }
    if cfg.qk_norm:
        layer |= {"self_attn.q_norm.weight": (Dh,), "self_attn.k_norm.weight": (Dh,)}
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(cfg.num_hidden_layers):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in layer.items()}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


@dataclass
class GemmaWeights:
    embed_tokens: object  # [V, D]; None when tied: then token t's embedding is lm_head[:, t]
    embed_scale: float  # sqrt(D), rounded to float32
    layers: list  # one dict per block: "self_attn.qkv_proj.weight" -> array, ...
    norm: object  # [D] the final norm's gain, 1 + w
    lm_head: object  # [D, V], transposed like every projection
    inv_freq: dict  # layer type -> [Dh/2] RoPE inverse frequencies


def norm_gain(w):
    """Gemma's RMSNorm multiplies by (1 + w) (its checkpoints store the gain minus one, so zeros
    mean "no change"); adding the 1 once here, in float32 as transformers does, lets the forward
    pass use the plain ops.rms_norm."""
    return np.float32(1.0) + w


def arrange_layer(layer):
    """One block's tensors laid out for the forward pass, as in the Llama family: q, k, v stacked
    into self_attn.qkv_proj and gate, up into mlp.gate_up_proj (one product each instead of
    three or two), every projection transposed to [in, out], and every norm's gain made 1 + w."""
    return {name: norm_gain(t) if name.endswith("norm.weight") else t for name, t in transposed(stacked(layer)).items()}


def inverse_frequencies(theta, factor, head_dim):
    """RoPE speeds for one layer type; linear scaling divides each by `factor` (in float32, as
    transformers does), which is the same as dividing every position by it."""
    inv_freq = rope_inverse_frequencies(theta, head_dim)  # [Dh/2]
    return inv_freq if factor is None else inv_freq / np.float32(factor)


def load_weights(tensors, cfg, xp):
    """The checked checkpoint tensors (name -> NumPy array, see weights.py), arranged and on the device."""
    layers = [on_device(xp, arrange_layer(take_layer(tensors, i))) for i in range(cfg.num_hidden_layers)]
    embed, lm_head = embedding_and_head(xp, tensors, cfg.tie_word_embeddings)
    # transformers keeps sqrt(D) as a tensor of the model's dtype, so it multiplies by sqrt(D)
    # rounded to float32 here (in a bfloat16 model sqrt(3072) = 55.43 even becomes 55.5).
    embed_scale = float(np.float32(math.sqrt(cfg.hidden_size)))
    inv_freq = {kind: xp.asarray(inverse_frequencies(*cfg.rope[kind], cfg.head_dim)) for kind in set(cfg.layer_types)}
    norm = xp.asarray(norm_gain(tensors.pop("model.norm.weight")))
    return GemmaWeights(embed, embed_scale, layers, norm, lm_head, inv_freq)


# ---------------------------------------------------------------- importing GGUF (refimpl/gguf_import.py)

# What llama.cpp's convert_hf_to_gguf.py (Gemma2Model, Gemma3Model) writes, and how we read it back.
# GGUF tensor name -> HF tensor name. Per-block names are "blk.{i}." + key. Note the shift of the
# norm names: llama.cpp calls the pre-MLP norm ffn_norm, where Llama's ffn_norm is HF's
# post_attention_layernorm; Gemma's post_attention_layernorm is post_attention_norm here.
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # only in a hand-made file: the converter drops Gemma 2's lm_head
}
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
GEMMA3_BLOCK_NAMES = BLOCK_NAMES | {
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
GGUF_MODEL_TYPES = {"gemma2": "gemma2", "gemma3": "gemma3_text"}  # general.architecture -> model_type


def gguf_config(meta, tensor_names):
    """config.json as transformers' Gemma2Config / Gemma3TextConfig write it, from a GGUF's metadata.

    Three settings have no GGUF key, so we choose what transformers' GGUF loader gets (its config
    defaults), and llama.cpp agrees for every released model except the 27B ones:
      - query_pre_attn_scalar: 256. (llama.cpp derives it: head_dim, or D / H for its "27B" type.)
      - the local/global layer pattern: Gemma 2 alternates, starting local; Gemma 3 has a global
        layer every 6th layer. (llama.cpp hard-codes the same patterns, set_swa_pattern(2) and (6).)
    Gemma 3's local RoPE base is stored as rope.freq_base_swa by recent converters; older files
    lack it and mean 10000, which llama.cpp hard-codes. What the file does say we read, as
    llama.cpp does, though transformers' loader (integrations/ggml.py) skips some of it: Gemma 2's
    two soft caps, Gemma 3's final cap, rope.scaling and rope.freq_base_swa.
    """
    arch = meta["general.architecture"]
    gemma3 = arch == "gemma3"
    L = meta[f"{arch}.block_count"]
    hidden, heads = meta[f"{arch}.embedding_length"], meta[f"{arch}.attention.head_count"]
    head_dim = meta.get(f"{arch}.attention.key_length", hidden // heads)
    if meta.get(f"{arch}.attention.value_length", head_dim) != head_dim:
        raise ValueError(f"{arch}.attention.value_length differs from key_length; Gemma has one head_dim")
    window = meta.get(f"{arch}.attention.sliding_window")
    every = 6 if gemma3 else 2  # every n-th layer is global
    if window is None:  # a Gemma 3 without local layers (its converter writes no window then)
        layer_types = ["full_attention"] * L
    else:
        layer_types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(L)]
    tokens = meta["tokenizer.ggml.tokens"]
    config = {
        "architectures": ["Gemma3ForCausalLM" if gemma3 else "Gemma2ForCausalLM"],
        "model_type": GGUF_MODEL_TYPES[arch],
        "vocab_size": meta.get(f"{arch}.vocab_size", len(tokens)),
        "hidden_size": hidden,
        "intermediate_size": meta[f"{arch}.feed_forward_length"],
        "num_hidden_layers": L,
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": meta[f"{arch}.attention.layer_norm_rms_epsilon"],
        "query_pre_attn_scalar": 256,  # not in GGUF: transformers' default (see above)
        # Missing caps mean transformers' and llama.cpp's defaults: Gemma 2 caps at 50 and 30;
        # Gemma 3 has no score cap and caps logits only when the file says so.
        "attn_logit_softcapping": None if gemma3 else meta.get(f"{arch}.attn_logit_softcapping", 50.0),
        "final_logit_softcapping": meta.get(f"{arch}.final_logit_softcapping", None if gemma3 else 30.0),
        "sliding_window": window,
        "layer_types": layer_types,
        "rope_parameters": gguf_rope(meta, arch),
        "max_position_embeddings": meta[f"{arch}.context_length"],
        # Without a separate output matrix the logits reuse the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if "tokenizer.ggml.padding_token_id" in meta:
        config["pad_token_id"] = meta["tokenizer.ggml.padding_token_id"]
    return config


def gguf_rope(meta, arch):
    """rope_parameters: Gemma 2's one RoPE (its converter writes no base: llama.cpp's default 10000);
    Gemma 3's global RoPE (rope.freq_base, stretched by rope.scaling) and local one (freq_base_swa)."""
    if arch == "gemma2":
        return {"rope_type": "default", "rope_theta": meta.get(f"{arch}.rope.freq_base", 10000.0)}
    full = {"rope_type": "default", "rope_theta": meta.get(f"{arch}.rope.freq_base", 1000000.0)}
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":  # only the global layers are stretched (the converter reads full_attention's)
        full = {"rope_type": "linear", "rope_theta": full["rope_theta"], "factor": meta[f"{arch}.rope.scaling.factor"]}
    elif scaling != "none":
        raise ValueError(f"{arch}.rope.scaling.type {scaling!r} is not supported (supported: none, linear)")
    local = {"rope_type": "default", "rope_theta": meta.get(f"{arch}.rope.freq_base_swa", 10000.0)}
    return {"full_attention": full, "sliding_attention": local}


def hf_name(gguf_name, config):
    """The HF name of a GGUF tensor; an error that names it if we do not know it."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    block_names = GEMMA3_BLOCK_NAMES if config["model_type"] == "gemma3_text" else BLOCK_NAMES
    prefix, _, rest = gguf_name.partition(".")
    block, _, key = rest.partition(".")
    if prefix == "blk" and block.isdigit() and key in block_names:
        return f"model.layers.{block}.{block_names[key]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no {config['model_type']} counterpart in the HF layout")


def gguf_tensors(gguf_name, w, config):
    """The HF tensor of one dequantized GGUF tensor: renamed, with the converter's +1 on norms undone.

    llama.cpp's RMSNorm multiplies by w, not Gemma's (1 + w), so its converter stores every norm
    gain (names ending in norm.weight, q_norm and k_norm included) as w + 1; HF stores w. In
    float32, (w + 1) - 1 is exact but w + 1 may already have rounded off w's lowest bits, so the
    w we return can differ from the original in those bits; 1 + w, the gain the forward pass
    uses (norm_gain), is the same number either way. Q and K are not permuted: llama.cpp runs
    Gemma with NEOX-style (rotate-half) RoPE, HF's own layout.
    """
    if gguf_name.endswith("norm.weight"):
        w = w - np.float32(1.0)
    yield hf_name(gguf_name, config), w


# ---------------------------------------------------------------- the forward pass


def embed(xp, W, ids):
    """The embedding rows of token ids [N] -> [N, D], times sqrt(D); a tied model reads them as
    columns of the head. The scale keeps the embeddings' size comparable to the blocks' outputs,
    which the residual stream adds to them."""
    return layout.embed(xp, W.embed_tokens, W.lm_head, ids) * W.embed_scale  # [N, D]


def self_attention(xp, cfg, w, layer, x, cos, sin, window, batch):
    """Project to q, k, v, (Gemma 3) normalise each head, rotate q and k by position, attend over
    each sequence's cache with Gemma's scale and soft cap, project back."""
    N, H, Hkv, Dh = x.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv = linear(batch, x, w, "self_attn.qkv_proj", False)  # [N, (H + 2 Hkv) Dh]: q, k, v side by side
    q = xp.reshape(qkv[:, :H * Dh], (N, H, Dh))
    k = xp.reshape(qkv[:, H * Dh:(H + Hkv) * Dh], (N, Hkv, Dh))
    v = xp.reshape(qkv[:, (H + Hkv) * Dh:], (N, Hkv, Dh))
    if cfg.qk_norm:  # Gemma 3: each head's query and key to unit RMS (times a gain), before RoPE
        q = rms_norm(xp, q, w["self_attn.q_norm.weight"], cfg.rms_norm_eps)  # [N, H, Dh]
        k = rms_norm(xp, k, w["self_attn.k_norm.weight"], cfg.rms_norm_eps)  # [N, Hkv, Dh]
    q, k = rope(xp, q, cos, sin), rope(xp, k, cos, sin)
    out = attend(xp, batch, layer, q, k, v, window,
                 scale=cfg.query_pre_attn_scalar ** -0.5, softcap=cfg.attn_logit_softcapping)  # [N, H*Dh]
    return linear(batch, out, w, "self_attn.o_proj", False)  # [N, D]


def block(xp, cfg, w, layer, x, cos, sin, window, batch):
    """One block: each half's output is normalised again before it joins the residual stream."""
    eps = cfg.rms_norm_eps
    h = self_attention(xp, cfg, w, layer, rms_norm(xp, x, w["input_layernorm.weight"], eps), cos, sin, window, batch)
    x = x + rms_norm(xp, h, w["post_attention_layernorm.weight"], eps)  # [N, D]
    h = rms_norm(xp, x, w["pre_feedforward_layernorm.weight"], eps)
    h = gated_mlp(xp, batch, w, h, cfg.intermediate_size, False, gelu_tanh)  # GeGLU
    return x + rms_norm(xp, h, w["post_feedforward_layernorm.weight"], eps)  # [N, D]


def forward(model, tokens, caches, all_logits=False):
    """Run new tokens of one or more sequences through the model, extending their caches.

    tokens: one list of token ids per sequence; caches: that sequence's KVCache, whose `length`
    says how many positions came before. Returns logits [B, V] for the last token of each
    sequence, or [N, V] for every token when `all_logits` (scoring a prompt); a list of bools
    asks per sequence, rows in sequence order (Batch.logits).
    """
    xp, cfg, W = model.xp, model.config, model.weights
    batch = Batch.of(xp, tokens, caches)
    # Local and global layers may turn q and k at different speeds: one cos/sin pair per kind.
    rotations = {kind: rope_cos_sin(xp, inv_freq, batch.positions) for kind, inv_freq in W.inv_freq.items()}

    x = embed(xp, W, batch.ids)  # [N, D]
    batch.record(0, x)  # the residual stream before the blocks, kept only by an inspected sequence (inspection.py)
    for layer, (w, kind) in enumerate(zip(W.layers, cfg.layer_types)):
        window = cfg.sliding_window if kind == "sliding_attention" else None
        x = block(xp, cfg, w, layer, x, *rotations[kind], window, batch)
        batch.record(layer + 1, x)  # and after each block
    batch.advance()

    # Each sequence's last position predicts its next token; scoring a prompt wants every position's.
    logits = batch.logits(rms_norm(xp, x, W.norm, cfg.rms_norm_eps), W.lm_head, all_logits)  # [B, V] or [N, V]
    if cfg.final_logit_softcapping is not None:
        logits = soft_cap(xp, logits, cfg.final_logit_softcapping)
    return logits


def output_logits(model, x):
    """The final norm and the output head on residual-stream rows x [N, D]: logits [N, V], what the
    model would predict if the blocks ended there. forward applies the same steps to the rows that
    predict (Batch.logits); the logit lens (inspection.py) applies them to every layer's rows."""
    xp, cfg, W = model.xp, model.config, model.weights
    logits = rms_norm(xp, x, W.norm, cfg.rms_norm_eps) @ W.lm_head  # [N, V]
    if cfg.final_logit_softcapping is not None:
        logits = soft_cap(xp, logits, cfg.final_logit_softcapping)
    return logits
