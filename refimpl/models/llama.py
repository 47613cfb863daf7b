"""The Llama family (Llama, Mistral, Qwen2, Qwen3): token ids in, next-token logits out.

One network with flags. A token meets, in order: its embedding; per block, RMSNorm -> attention
with rotary positions -> residual, RMSNorm -> SwiGLU MLP -> residual; a final RMSNorm and the
output head. What tells the members apart is read from config.json into named flags:

  model_type            llama | mistral | qwen2 | qwen3
  qkv_bias              biases on q/k/v projections: `attention_bias` (Llama, Qwen3), always for Qwen2
  o_bias                bias on the output projection: `attention_bias` (Llama, Qwen3)
  mlp_bias              biases on gate/up/down projections (`mlp_bias`, Llama)
  qk_norm               an RMSNorm over each head's Dh values of q and of k, before RoPE, with
                        learned gains self_attn.q_norm / k_norm [Dh] shared by all heads (Qwen3)
  tie_word_embeddings   the output head reuses the token embedding matrix
  sliding_window        each token attends to at most this many keys (Mistral; Qwen2 and Qwen3
                        only when `use_sliding_window` is true); None means full causal attention
  layer_windows         per layer, sliding_window or None: the layers `layer_types` names
                        "sliding_attention" slide (Qwen without layer_types: the layers from
                        `max_window_layers` on), the others attend to every earlier key
  rope_scaling          None, or the llama3 frequency rescaling (Llama 3.1+)

Several sequences share one call (refimpl/batching.py): their tokens are stacked into one [N, D]
matrix, and only attention needs to know which rows belong to which sequence.

Dimension letters as in ops.py: N tokens in this call, D width, H / Hkv heads, Dh head width,
F feed-forward width, V vocabulary, B sequences.
"""

from dataclasses import dataclass

from refimpl.batching import Batch, attend
from refimpl.config import ConfigError, rope_parameters
from refimpl.layout import embed, embedding_and_head, on_device, stacked, take_layer, transposed
from refimpl.ops import gated_mlp, linear, rms_norm, rope, rope_cos_sin, rope_inverse_frequencies, silu

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


# ---------------------------------------------------------------- config.json


@dataclass(frozen=True)
class LlamaConfig:
    model_type: str
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_hidden_layers: int  # L
    num_attention_heads: int  # H
    num_key_value_heads: int  # Hkv
    head_dim: int  # Dh
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None
    layer_windows: tuple  # [L] the window of each layer, or None
    bos_token_id: int | None
    eos_token_id: int | list | None

    @classmethod
    def from_dict(cls, c):
        model_type = c.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {model_type!r} is not a Llama-family type ({', '.join(MODEL_TYPES)})")
        if c.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {c['hidden_act']!r} is not supported (only silu)")
        rope_theta, rope_scaling = rope_parameters(c)
        heads = c["num_attention_heads"]
        attention_bias = bool(c.get("attention_bias", False))
        windows = layer_windows(c, model_type)
        return cls(
            model_type=model_type,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rms_norm_eps=c["rms_norm_eps"],
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=c["max_position_embeddings"],
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            # Qwen2's modeling code always puts biases on q, k and v, and none on o.
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias and model_type in ("llama", "qwen3"),
            mlp_bias=bool(c.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=max((w for w in windows if w is not None), default=None),
            layer_windows=windows,
            bos_token_id=c.get("bos_token_id"),
            eos_token_id=c.get("eos_token_id"),
        )


Config = LlamaConfig  # the name the registry (models/__init__.py) looks for


def layer_windows(c, model_type):
    """The attention window of each layer (None: full causal attention), as transformers decides it."""
    L, window = c["num_hidden_layers"], c.get("sliding_window")
    qwen = model_type in ("qwen2", "qwen3")
    if qwen and not c.get("use_sliding_window", False):
        window = None  # Qwen configs carry a window that is used only when use_sliding_window is set
    kinds = c.get("layer_types")
    if kinds is None and qwen:  # Qwen slides only in the layers from max_window_layers on
        first = c.get("max_window_layers", 28)  # transformers' Qwen2Config and Qwen3Config default
        kinds = ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(L)]
    if kinds is None:
        kinds = ["full_attention" if window is None else "sliding_attention"] * L
    if len(kinds) != L or set(kinds) - {"full_attention", "sliding_attention"}:
        raise ConfigError(f"layer_types {kinds!r} is not one of full_attention / sliding_attention per layer")
    if "sliding_attention" in kinds and window is None:
        # transformers' Qwen refuses this too: sliding layers with no window (or use_sliding_window off)
        raise ConfigError("layer_types names sliding_attention layers, but no sliding_window is in use")
    return tuple(window if kind == "sliding_attention" else None for kind in kinds)


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
        "mlp.gate_proj.weight": (F, D),
        "mlp.up_proj.weight": (F, D),
        "mlp.down_proj.weight": (D, F),
    }
    if cfg.qkv_bias:
        layer |= {"self_attn.q_proj.bias": (H * Dh,), "self_attn.k_proj.bias": (Hkv * Dh,),
                  "self_attn.v_proj.bias": (Hkv * Dh,)}
    if cfg.o_bias:
        layer["self_attn.o_proj.bias"] = (D,)
    if cfg.mlp_bias:
        layer |= {"mlp.gate_proj.bias": (F,), "mlp.up_proj.bias": (F,), "mlp.down_proj.bias": (D,)}
    if cfg.qk_norm:
        layer |= {"self_attn.q_norm.weight": (Dh,), "self_attn.k_norm.weight": (Dh,)}
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(cfg.num_hidden_layers):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in layer.items()}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


@dataclass
class LlamaWeights:
    embed_tokens: object  # [V, D]; None when tied: then token t's embedding is lm_head[:, t]
    layers: list  # one dict per block: "self_attn.qkv_proj.weight" -> array, ...
    norm: object  # [D]
    lm_head: object  # [D, V], transposed like every projection (see arrange_layer)
    inv_freq: object  # [Dh/2] RoPE inverse frequencies


def arrange_layer(layer):
    """One block's tensors laid out for the forward pass (refimpl/layout.py): q, k, v stacked into
    self_attn.qkv_proj, gate and up into mlp.gate_up_proj, every projection [in, out]."""
    return transposed(stacked(layer))


def load_weights(tensors, cfg, xp):
    """The checked checkpoint tensors (name -> NumPy array, see weights.py), arranged and on the device."""
    layers = [on_device(xp, arrange_layer(take_layer(tensors, i))) for i in range(cfg.num_hidden_layers)]
    embed, lm_head = embedding_and_head(xp, tensors, cfg.tie_word_embeddings)
    inv_freq = xp.asarray(rope_inverse_frequencies(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling))
    return LlamaWeights(embed, layers, xp.asarray(tensors.pop("model.norm.weight")), lm_head, inv_freq)


# ---------------------------------------------------------------- importing GGUF (refimpl/gguf_import.py)

# GGUF's general.architecture -> config.json's model_type and HF class. llama.cpp writes Llama and
# Mistral as "llama", Qwen2 as "qwen2" and Qwen3 as "qwen3": the same network, told apart by flags.
GGUF_MODEL_TYPES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}

# GGUF tensor name -> HF tensor name. Per-block names are "blk.{i}." + key.
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",  # Qwen2 always; Llama and Qwen3 with attention_bias
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",  # Llama and Qwen3 with attention_bias
    "attn_q_norm.weight": "self_attn.q_norm.weight",  # Qwen3's per-head QK-norm gains [Dh]
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def gguf_config(meta, tensor_names):
    """config.json as HF's LlamaConfig, Qwen2Config or Qwen3Config writes it, from a GGUF file's metadata."""
    arch = meta["general.architecture"]
    model_type, hf_class = GGUF_MODEL_TYPES[arch]
    hidden, heads = meta[f"{arch}.embedding_length"], meta[f"{arch}.attention.head_count"]
    tokens = meta["tokenizer.ggml.tokens"]
    # The head width is written as attention.key_length when config.json named a head_dim (Qwen3:
    # 128 for a width of 1024 and 16 heads); Llama's converter also writes it as rope.dimension_count.
    head_dim = meta.get(f"{arch}.attention.key_length",
                        meta.get(f"{arch}.rope.dimension_count", hidden // heads))
    config = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": meta[f"{arch}.feed_forward_length"],
        "num_hidden_layers": meta[f"{arch}.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "vocab_size": meta.get(f"{arch}.vocab_size", len(tokens)),
        "rms_norm_eps": meta[f"{arch}.attention.layer_norm_rms_epsilon"],
        "rope_theta": meta.get(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": meta[f"{arch}.context_length"],
        # Without a separate output matrix the logits reuse the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if model_type != "qwen2":  # Qwen2's q/k/v biases are not a flag: its config has no attention_bias
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    if model_type == "llama":
        config["mlp_bias"] = False
    if "tokenizer.ggml.padding_token_id" in meta:
        config["pad_token_id"] = meta["tokenizer.ggml.padding_token_id"]
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        config["rope_scaling"] = {"rope_type": scaling, "factor": meta[f"{arch}.rope.scaling.factor"]}
        if f"{arch}.rope.scaling.original_context_length" in meta:
            original = meta[f"{arch}.rope.scaling.original_context_length"]
            config["rope_scaling"]["original_max_position_embeddings"] = original
    return config


def hf_name(gguf_name):
    """The HF name of a GGUF tensor; an error that names it if we do not know it."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    prefix, _, rest = gguf_name.partition(".")
    block, _, key = rest.partition(".")
    if prefix == "blk" and block.isdigit() and key in BLOCK_NAMES:
        return f"model.layers.{block}.{BLOCK_NAMES[key]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama-family counterpart in the HF layout")


def unpermute_qk(w, n_heads):
    """Undo llama.cpp's Q/K row permutation, per head: rows [2, Dh/2] -> [Dh/2, 2] back to [2, Dh/2].

    llama.cpp's convert_hf_to_gguf.py `permute` reshapes each head's Dh rows as [2, Dh/2]
    (first half, second half) and swaps the axes, interleaving the halves so that rotate-half
    pairs (i, i + Dh/2) become adjacent rows (2i, 2i + 1). Reading the rows as [Dh/2, 2] and
    swapping back restores HF's order. A bias [H*Dh] is permuted, and restored, like the rows.
    """
    head_dim = w.shape[0] // n_heads
    pairs = w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:])  # [H*Dh, D] -> [H, Dh/2, 2, D]
    return pairs.swapaxes(1, 2).reshape(w.shape)  # -> [H, 2, Dh/2, D] -> [H*Dh, D]


def gguf_tensors(gguf_name, w, config):
    """The HF tensor(s) of one dequantized GGUF tensor: renamed, and for Llama Q/K rows un-permuted.

    Only llama.cpp's LlamaModel permutes Q and K (weights and biases), because its Llama graph
    rotates adjacent pairs (GPT-J style RoPE) where HF rotates the two halves of a head. Its
    Qwen2 and Qwen3 graphs rotate halves as HF does (NEOX style), so their tensors are stored
    in HF's order and pass through unchanged.
    """
    key = gguf_name.rpartition(".")[0].rpartition(".")[2]  # "blk.0.attn_q.weight" -> "attn_q"
    if config["model_type"] == "llama" and key in ("attn_q", "attn_k"):
        w = unpermute_qk(w, config["num_attention_heads" if key == "attn_q" else "num_key_value_heads"])
    yield hf_name(gguf_name), w


# ---------------------------------------------------------------- the forward pass


def self_attention(xp, cfg, w, layer, x, cos, sin, batch):
    """Project to q, k, v, rotate q and k by position, attend over each sequence's cache, project back."""
    N, H, Hkv, Dh = x.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv = linear(batch, x, w, "self_attn.qkv_proj", cfg.qkv_bias)  # [N, (H + 2 Hkv) Dh]: q, k, v side by side
    q = xp.reshape(qkv[:, :H * Dh], (N, H, Dh))
    k = xp.reshape(qkv[:, H * Dh:(H + Hkv) * Dh], (N, Hkv, Dh))
    v = xp.reshape(qkv[:, (H + Hkv) * Dh:], (N, Hkv, Dh))
    if cfg.qk_norm:  # Qwen3: each head's q and k scaled to unit RMS (learned gains [Dh] shared by the
        # heads), so that no attention score grows large however large the block input grows
        q = rms_norm(xp, q, w["self_attn.q_norm.weight"], cfg.rms_norm_eps)  # [N, H, Dh]
        k = rms_norm(xp, k, w["self_attn.k_norm.weight"], cfg.rms_norm_eps)  # [N, Hkv, Dh]
    q, k = rope(xp, q, cos, sin), rope(xp, k, cos, sin)
    out = attend(xp, batch, layer, q, k, v, cfg.layer_windows[layer])  # [N, H*Dh]
    return linear(batch, out, w, "self_attn.o_proj", cfg.o_bias)  # [N, D]


def block(xp, cfg, w, layer, x, cos, sin, batch):
    """One transformer block with pre-normalisation and residual connections."""
    x = x + self_attention(xp, cfg, w, layer, rms_norm(xp, x, w["input_layernorm.weight"], cfg.rms_norm_eps),
                           cos, sin, batch)
    h = rms_norm(xp, x, w["post_attention_layernorm.weight"], cfg.rms_norm_eps)
    return x + gated_mlp(xp, batch, w, h, cfg.intermediate_size, cfg.mlp_bias, silu)  # SwiGLU


def forward(model, tokens, caches, all_logits=False):
    """Run new tokens of one or more sequences through the model, extending their caches.

    tokens: one list of token ids per sequence; caches: that sequence's KVCache, whose `length`
    says how many positions came before. Returns logits [B, V] for the last token of each
    sequence, or [N, V] for every token when `all_logits` (scoring a prompt); a list of bools
    asks per sequence, rows in sequence order (Batch.logits).
    """
    xp, cfg, W = model.xp, model.config, model.weights
    batch = Batch.of(xp, tokens, caches)
    cos, sin = rope_cos_sin(xp, W.inv_freq, batch.positions)

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
