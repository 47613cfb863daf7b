"""Qwen3-MoE: Qwen3's attention with a sparse mixture-of-experts MLP; token ids in, logits out.

A token meets, in order: its embedding; per block, RMSNorm -> attention (q and k normalised per
head, then rotated by position) -> residual, RMSNorm -> MLP -> residual; a final RMSNorm and the
output head. What is new against Qwen3 (refimpl/models/llama.py) is the MLP of most blocks: a
router scores all E experts for each token, the token goes to the k best (a softmax over the E
scores, top k), and its MLP output is the weighted sum of those k experts' SwiGLU outputs.
Only k of E experts run per token, so the model holds E times the MLP weights of a dense model
but computes with k of them (Qwen3-30B-A3B: 128 experts, 8 per token).

Config flags read from config.json:

  num_experts           E experts per MoE block (transformers 5 writes it as `num_local_experts`)
  num_experts_per_tok   k experts per token
  norm_topk_prob        rescale a token's k router probabilities to sum to 1; otherwise they stay
                        shares of all E
  moe_intermediate_size each expert's feed-forward width (Fe)
  intermediate_size     the feed-forward width F of the dense blocks
  decoder_sparse_step   block i is a MoE block when (i + 1) is a multiple of this ...
  mlp_only_layers       ... and i is not listed here (then it has a dense SwiGLU MLP), as
                        transformers decides; with num_experts 0 every block is dense
  attention_bias        biases on the q, k, v and o projections
  tie_word_embeddings   the output head reuses the token embedding matrix
  sliding_window        each token attends to at most this many keys, in every layer, when
                        `use_sliding_window` is true (transformers' Qwen3-MoE reads neither
                        max_window_layers nor layer_types); otherwise full causal attention
  rope_scaling          None, or the llama3 frequency rescaling

Checkpoint names (as transformers 5 saves them): the router model.layers.{i}.mlp.gate.weight
[E, D] and each expert's model.layers.{i}.mlp.experts.{e}.gate_proj / up_proj / down_proj.weight.
Shared experts or router biases (other MoE families have them) are not part of Qwen3-MoE: a
config asking for them is refused, and strict loading refuses any tensor not listed here.

Dimension letters as in ops.py: N tokens in this call, D width, H / Hkv heads, Dh head width,
F dense feed-forward width, Fe expert width, E experts, k experts per token, V vocabulary,
B sequences.
"""

from dataclasses import dataclass

from refimpl.batching import Batch, attend
from refimpl.config import ConfigError, rope_parameters
from refimpl.layout import embed, embedding_and_head, on_device, stacked, stacked_experts, take_layer, transposed
from refimpl.ops import gated_mlp, linear, moe_mlp, rms_norm, rope, rope_cos_sin, rope_inverse_frequencies, silu

MODEL_TYPES = ("qwen3_moe",)


# ---------------------------------------------------------------- config.json


@dataclass(frozen=True)
class Qwen3MoeConfig:
    model_type: str
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F, the dense blocks' MLP
    moe_intermediate_size: int  # Fe, each expert's MLP
    num_hidden_layers: int  # L
    num_attention_heads: int  # H
    num_key_value_heads: int  # Hkv
    head_dim: int  # Dh
    num_experts: int  # E
    num_experts_per_tok: int  # k
    norm_topk_prob: bool
    moe_layers: tuple  # the indices of the blocks whose MLP is the mixture of experts
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_id: int | list | None

    @classmethod
    def from_dict(cls, c):
        if c.get("model_type") not in MODEL_TYPES:
            raise ConfigError(f"model_type {c.get('model_type')!r} is not {MODEL_TYPES[0]!r}")
        if c.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {c['hidden_act']!r} is not supported (only silu)")
        for name in ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts"):
            if c.get(name):
                raise ConfigError(f"shared experts ({name} = {c[name]}) are not part of Qwen3-MoE")
        if "num_experts" not in c and "num_local_experts" not in c:
            raise ConfigError("config.json gives no num_experts (or num_local_experts)")
        rope_theta, rope_scaling = rope_parameters(c)
        heads, layers = c["num_attention_heads"], c["num_hidden_layers"]
        experts = c["num_experts"] if "num_experts" in c else c["num_local_experts"]
        step, dense = c.get("decoder_sparse_step", 1), set(c.get("mlp_only_layers") or [])
        return cls(
            model_type=c["model_type"],
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            moe_intermediate_size=c["moe_intermediate_size"],
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            num_experts=experts,
            num_experts_per_tok=c["num_experts_per_tok"],
            norm_topk_prob=bool(c.get("norm_topk_prob", False)),
            # transformers' Qwen3MoeDecoderLayer: experts where (i + 1) % step == 0, unless listed dense.
            moe_layers=tuple(i for i in range(layers)
                             if experts > 0 and (i + 1) % step == 0 and i not in dense),
            rms_norm_eps=c["rms_norm_eps"],
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=c["max_position_embeddings"],
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            attention_bias=bool(c.get("attention_bias", False)),
            sliding_window=c.get("sliding_window") if c.get("use_sliding_window", False) else None,
            bos_token_id=c.get("bos_token_id"),
            eos_token_id=c.get("eos_token_id"),
        )


Config = Qwen3MoeConfig  # the name the registry (models/__init__.py) looks for


# ---------------------------------------------------------------- the checkpoint


def expected_shapes(cfg):
    """Every tensor name the config implies, with its shape (Hugging Face's names and layout)."""
    D, F, Fe, V, Dh = cfg.hidden_size, cfg.intermediate_size, cfg.moe_intermediate_size, cfg.vocab_size, cfg.head_dim
    H, Hkv, E = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_experts
    attention = {
        "input_layernorm.weight": (D,),
        "self_attn.q_proj.weight": (H * Dh, D),
        "self_attn.k_proj.weight": (Hkv * Dh, D),
        "self_attn.v_proj.weight": (Hkv * Dh, D),
        "self_attn.q_norm.weight": (Dh,),
        "self_attn.k_norm.weight": (Dh,),
        "self_attn.o_proj.weight": (D, H * Dh),
        "post_attention_layernorm.weight": (D,),
    }
    if cfg.attention_bias:
        attention |= {"self_attn.q_proj.bias": (H * Dh,), "self_attn.k_proj.bias": (Hkv * Dh,),
                      "self_attn.v_proj.bias": (Hkv * Dh,), "self_attn.o_proj.bias": (D,)}
    dense = {"mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D), "mlp.down_proj.weight": (D, F)}
    sparse = {"mlp.gate.weight": (E, D)}  # the router
    for e in range(E):
        sparse |= {f"mlp.experts.{e}.gate_proj.weight": (Fe, D), f"mlp.experts.{e}.up_proj.weight": (Fe, D),
                   f"mlp.experts.{e}.down_proj.weight": (D, Fe)}
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(cfg.num_hidden_layers):
        layer = attention | (sparse if i in cfg.moe_layers else dense)
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in layer.items()}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


@dataclass
class Qwen3MoeWeights:
    embed_tokens: object  # [V, D]; None when tied: then token t's embedding is lm_head[:, t]
    layers: list  # one dict per block: "self_attn.qkv_proj.weight" -> array, ...
    norm: object  # [D]
    lm_head: object  # [D, V], transposed like every projection (see arrange_layer)
    inv_freq: object  # [Dh/2] RoPE inverse frequencies


def arrange_layer(layer, E):
    """Lay one block's matrices out for the forward pass; the numbers stay the checkpoint's.

    - q, k and v read the same input: one stacked matrix self_attn.qkv_proj, one product; so do
      a dense block's gate and up: mlp.gate_up_proj (see llama.py).
    - A MoE block's experts are stacked into 3-D arrays, expert e at index e, each expert's gate
      and up side by side, as transformers 5 holds them in memory: mlp.experts.gate_up_proj
      [E, D, 2Fe] and mlp.experts.down_proj [E, Fe, D].
    - Every projection is stored transposed, [in, out], so that `x @ W` is a plain row-major
      product (see llama.py); the router too: mlp.gate.weight [D, E].
    """
    layer = stacked(layer)
    if "mlp.gate.weight" in layer:  # a MoE block
        layer = stacked_experts(layer, E, "mlp.experts.", "gate_proj.weight", "up_proj.weight", "down_proj.weight",
                                into="mlp.experts")
    return transposed(layer)


def load_weights(tensors, cfg, xp):
    """The checked checkpoint tensors (name -> NumPy array, see weights.py), arranged and on the device."""
    layers = [on_device(xp, arrange_layer(take_layer(tensors, i), cfg.num_experts)) for i in range(cfg.num_hidden_layers)]
    embed, lm_head = embedding_and_head(xp, tensors, cfg.tie_word_embeddings)
    inv_freq = xp.asarray(rope_inverse_frequencies(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling))
    return Qwen3MoeWeights(embed, layers, xp.asarray(tensors.pop("model.norm.weight")), lm_head, inv_freq)


# ---------------------------------------------------------------- the forward pass


def self_attention(xp, cfg, w, layer, x, cos, sin, batch):
    """Qwen3's attention: project to q, k, v, normalise each head of q and k, rotate them by
    position, attend over each sequence's cache, project back."""
    N, H, Hkv, Dh = x.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv = linear(batch, x, w, "self_attn.qkv_proj", cfg.attention_bias)  # [N, (H + 2 Hkv) Dh]: q, k, v side by side
    q = xp.reshape(qkv[:, :H * Dh], (N, H, Dh))
    k = xp.reshape(qkv[:, H * Dh:(H + Hkv) * Dh], (N, Hkv, Dh))
    v = xp.reshape(qkv[:, (H + Hkv) * Dh:], (N, Hkv, Dh))
    # QK-norm: each head's q and k scaled to unit RMS (with learned gains [Dh] shared by the
    # heads), so that no attention score grows large however large the block input grows.
    q = rms_norm(xp, q, w["self_attn.q_norm.weight"], cfg.rms_norm_eps)  # [N, H, Dh]
    k = rms_norm(xp, k, w["self_attn.k_norm.weight"], cfg.rms_norm_eps)  # [N, Hkv, Dh]
    q, k = rope(xp, q, cos, sin), rope(xp, k, cos, sin)
    out = attend(xp, batch, layer, q, k, v, cfg.sliding_window)  # [N, H*Dh]
    return linear(batch, out, w, "self_attn.o_proj", cfg.attention_bias)  # [N, D]


def mlp(xp, cfg, w, layer, x, batch):
    """The block's MLP: the mixture of experts in a MoE block, one dense SwiGLU MLP otherwise."""
    if layer in cfg.moe_layers:
        return moe_mlp(xp, x, w["mlp.gate.weight"], w["mlp.experts.gate_up_proj"], w["mlp.experts.down_proj"],
                       cfg.num_experts_per_tok, cfg.norm_topk_prob, silu)  # [N, D]
    return gated_mlp(xp, batch, w, x, cfg.intermediate_size, False, silu)  # [N, D]


def block(xp, cfg, w, layer, x, cos, sin, batch):
    """One transformer block with pre-normalisation and residual connections."""
    x = x + self_attention(xp, cfg, w, layer, rms_norm(xp, x, w["input_layernorm.weight"], cfg.rms_norm_eps),
                           cos, sin, batch)
    return x + mlp(xp, cfg, w, layer, rms_norm(xp, x, w["post_attention_layernorm.weight"], cfg.rms_norm_eps), batch)


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
