"""The Mixtral family (Mistral AI's sparse mixture of experts): token ids in, next-token logits out.

Mistral's network with its MLP replaced by a mixture of experts. A token meets, in order: its
embedding; per block, RMSNorm -> attention with rotary positions (grouped-query, optionally
windowed) -> residual, RMSNorm -> mixture-of-experts MLP -> residual; a final RMSNorm and the
output head. What is new next to Llama / Mistral (refimpl/models/llama.py) is the MLP:

  - E experts, each a SwiGLU MLP of its own (w1 = gate, w3 = up, w2 = down), and a router, one
    linear map block_sparse_moe.gate [E, D] that scores every expert for every token.
  - Each token goes through only its top k experts (num_experts_per_tok, 2 in Mixtral 8x7B):
    softmax over all E router scores, keep the k largest probabilities, rescale those k to sum
    to 1, and add up the chosen experts' outputs weighted by them. A token's compute is k
    experts' worth, while the model holds E experts' parameters.

config.json flags this file reads:

  model_type            mixtral
  num_local_experts     E, experts per block
  num_experts_per_tok   k, experts each token is routed to
  sliding_window        each token attends to at most this many keys (the same in every layer);
                        None means full causal attention
  tie_word_embeddings   the output head reuses the token embedding matrix
  rope_parameters       rope_theta, and None or the llama3 frequency rescaling
  hidden_act            silu only (SwiGLU experts)
  head_dim              when present; else hidden_size / num_attention_heads

router_jitter_noise, router_aux_loss_coef and output_router_logits matter only in training and
are ignored.

Dimension letters as in ops.py: N tokens in this call, D width, H / Hkv heads, Dh head width,
F feed-forward width (of one expert), V vocabulary, B sequences, E experts, k experts per token.
"""

from dataclasses import dataclass

from refimpl.batching import Batch, attend
from refimpl.config import ConfigError, rope_parameters
from refimpl.layout import QKV, embed, embedding_and_head, on_device, stacked, stacked_experts, take_layer, transposed
from refimpl.ops import linear, moe_mlp, rms_norm, rope, rope_cos_sin, rope_inverse_frequencies, silu

MODEL_TYPES = ("mixtral",)


# ---------------------------------------------------------------- config.json


@dataclass(frozen=True)
class MixtralConfig:
    model_type: str
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F, of each expert
    num_hidden_layers: int  # L
    num_attention_heads: int  # H
    num_key_value_heads: int  # Hkv
    head_dim: int  # Dh
    num_local_experts: int  # E
    num_experts_per_tok: int  # k
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_id: int | list | None

    @classmethod
    def from_dict(cls, c):
        if c.get("model_type") not in MODEL_TYPES:
            raise ConfigError(f"model_type {c.get('model_type')!r} is not a Mixtral type ({', '.join(MODEL_TYPES)})")
        if c.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {c['hidden_act']!r} is not supported (only silu)")
        kinds = set(c.get("layer_types") or [])
        if len(kinds) > 1:
            raise ConfigError(f"layers of different attention kinds {sorted(kinds)} (layer_types) are not supported")
        experts, per_token = c.get("num_local_experts", 8), c.get("num_experts_per_tok", 2)
        if not 1 <= per_token <= experts:
            raise ConfigError(f"num_experts_per_tok {per_token} must be between 1 and num_local_experts {experts}")
        rope_theta, rope_scaling = rope_parameters(c)
        heads = c["num_attention_heads"]
        return cls(
            model_type=c["model_type"],
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            num_local_experts=experts,
            num_experts_per_tok=per_token,
            rms_norm_eps=c["rms_norm_eps"],
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=c["max_position_embeddings"],
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            sliding_window=None if kinds == {"full_attention"} else c.get("sliding_window"),
            bos_token_id=c.get("bos_token_id"),
            eos_token_id=c.get("eos_token_id"),
        )


Config = MixtralConfig  # the name the registry (models/__init__.py) looks for


# ---------------------------------------------------------------- the checkpoint


def expected_shapes(cfg):
    """Every tensor name the config implies, with its shape (Hugging Face's names and layout).

    transformers 5 holds the experts in memory as 3-D tensors but saves them, as Mistral AI's
    checkpoints have them, one expert at a time: block_sparse_moe.experts.<e>.w1/w2/w3.
    """
    D, F, V, Dh = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    H, Hkv, E = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_local_experts
    layer = {
        "input_layernorm.weight": (D,),
        "self_attn.q_proj.weight": (H * Dh, D),
        "self_attn.k_proj.weight": (Hkv * Dh, D),
        "self_attn.v_proj.weight": (Hkv * Dh, D),
        "self_attn.o_proj.weight": (D, H * Dh),
        "post_attention_layernorm.weight": (D,),
        "block_sparse_moe.gate.weight": (E, D),  # the router
    }
    for e in range(E):
        layer |= {f"block_sparse_moe.experts.{e}.w1.weight": (F, D),  # gate
                  f"block_sparse_moe.experts.{e}.w3.weight": (F, D),  # up
                  f"block_sparse_moe.experts.{e}.w2.weight": (D, F)}  # down
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(cfg.num_hidden_layers):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in layer.items()}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


@dataclass
class MixtralWeights:
    embed_tokens: object  # [V, D]; None when tied: then token t's embedding is lm_head[:, t]
    layers: list  # one dict per block: "self_attn.qkv_proj.weight" -> array, ...
    norm: object  # [D]
    lm_head: object  # [D, V], transposed like every projection (see arrange_layer)
    inv_freq: object  # [Dh/2] RoPE inverse frequencies


def arrange_layer(layer, E):
    """Lay one block's matrices out for the forward pass; the numbers stay the checkpoint's.

    - q, k and v read the same input: one stacked matrix self_attn.qkv_proj, one product.
    - The experts are stacked into 3-D arrays, expert e at index e, each expert's gate (w1) and
      up (w3) side by side as one matrix, as transformers 5 holds them in memory:
      block_sparse_moe.experts.gate_up_proj [E, D, 2F] and block_sparse_moe.experts.down_proj [E, F, D].
    - Every projection is stored transposed, [in, out], so that `x @ W` is a plain row-major
      product (see llama.py); the router too: block_sparse_moe.gate.weight [D, E].
    """
    layer = stacked(layer, (QKV,))  # [(H + 2 Hkv) Dh, D]
    layer = stacked_experts(layer, E, "block_sparse_moe.experts.", "w1.weight", "w3.weight", "w2.weight",
                            into="block_sparse_moe.experts")
    return transposed(layer)


def load_weights(tensors, cfg, xp):
    """The checked checkpoint tensors (name -> NumPy array, see weights.py), arranged and on the device."""
    layers = [on_device(xp, arrange_layer(take_layer(tensors, i), cfg.num_local_experts)) for i in range(cfg.num_hidden_layers)]
    embed, lm_head = embedding_and_head(xp, tensors, cfg.tie_word_embeddings)
    inv_freq = xp.asarray(rope_inverse_frequencies(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling))
    return MixtralWeights(embed, layers, xp.asarray(tensors.pop("model.norm.weight")), lm_head, inv_freq)


# ---------------------------------------------------------------- the forward pass


def self_attention(xp, cfg, w, layer, x, cos, sin, batch):
    """Mistral's attention: project to q, k, v, rotate q and k by position, attend, project back."""
    N, H, Hkv, Dh = x.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv = linear(batch, x, w, "self_attn.qkv_proj", False)  # [N, (H + 2 Hkv) Dh]: q, k, v side by side; no biases
    q = xp.reshape(qkv[:, :H * Dh], (N, H, Dh))
    k = xp.reshape(qkv[:, H * Dh:(H + Hkv) * Dh], (N, Hkv, Dh))
    v = xp.reshape(qkv[:, (H + Hkv) * Dh:], (N, Hkv, Dh))
    q, k = rope(xp, q, cos, sin), rope(xp, k, cos, sin)
    out = attend(xp, batch, layer, q, k, v, cfg.sliding_window)  # [N, H*Dh]
    return linear(batch, out, w, "self_attn.o_proj", False)  # [N, D]


def block(xp, cfg, w, layer, x, cos, sin, batch):
    """One transformer block with pre-normalisation and residual connections."""
    x = x + self_attention(xp, cfg, w, layer, rms_norm(xp, x, w["input_layernorm.weight"], cfg.rms_norm_eps),
                           cos, sin, batch)
    h = rms_norm(xp, x, w["post_attention_layernorm.weight"], cfg.rms_norm_eps)
    # The mixture of SwiGLU experts (ops.moe_mlp): each token through its top k experts only.
    # Mixtral always rescales a token's k router probabilities to sum to 1 (renormalize).
    return x + moe_mlp(xp, h, w["block_sparse_moe.gate.weight"], w["block_sparse_moe.experts.gate_up_proj"],
                       w["block_sparse_moe.experts.down_proj"], cfg.num_experts_per_tok, True, silu)


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
