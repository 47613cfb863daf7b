"""The OLMo 2 family (AI2's OLMo 2): token ids in, next-token logits out.

Llama's network with its norms moved. A token meets, in order: its embedding; per block,
attention with QK-norm and rotary positions -> RMSNorm -> residual, SwiGLU MLP -> RMSNorm ->
residual; a final RMSNorm and the output head. What is new next to Llama (refimpl/models/llama.py):

  - Post-norm residuals: a block normalises what attention and the MLP *return*, before adding
    it to the residual stream, and never normalises their input:
        x = x + post_attention_layernorm(attention(x))
        x = x + post_feedforward_layernorm(mlp(x))
    so a block has no input_layernorm (OLMo 2's paper: this keeps the residual stream's growth,
    and so training, stable).
  - QK-norm over the whole projection: q and k are each RMS-normalised as one row of H * Dh
    (Hkv * Dh) values, with a learned gain of that length, *before* they are split into heads
    and rotated. (Qwen3 and Gemma normalise each head separately; OLMo 2 does not.)

config.json flags this file reads:

  model_type            olmo2
  attention_bias        biases on the q, k, v and o projections
  tie_word_embeddings   the output head reuses the token embedding matrix
  rope_parameters       rope_theta, and None or the llama3 frequency rescaling
  hidden_act            silu only (SwiGLU)
  head_dim              when present; else hidden_size / num_attention_heads

Dimension letters as in ops.py: N tokens in this call, D width, H / Hkv heads, Dh head width,
F feed-forward width, V vocabulary, B sequences.
"""

from dataclasses import dataclass

from refimpl.batching import Batch, attend
from refimpl.config import ConfigError, rope_parameters
from refimpl.layout import embed, embedding_and_head, on_device, stacked, take_layer, transposed
from refimpl.ops import gated_mlp, linear, rms_norm, rope, rope_cos_sin, rope_inverse_frequencies, silu

MODEL_TYPES = ("olmo2",)


# ---------------------------------------------------------------- config.json


@dataclass(frozen=True)
class Olmo2Config:
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
    attention_bias: bool
    bos_token_id: int | None
    eos_token_id: int | list | None

    @classmethod
    def from_dict(cls, c):
        if c.get("model_type") not in MODEL_TYPES:
            raise ConfigError(f"model_type {c.get('model_type')!r} is not an OLMo 2 type ({', '.join(MODEL_TYPES)})")
        if c.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {c['hidden_act']!r} is not supported (only silu)")
        if c.get("sliding_window") is not None or len(set(c.get("layer_types") or [])) > 1:
            raise ConfigError("sliding-window attention (sliding_window, layer_types) is not part of OLMo 2")
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
            rms_norm_eps=c["rms_norm_eps"],
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=c["max_position_embeddings"],
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            attention_bias=bool(c.get("attention_bias", False)),
            bos_token_id=c.get("bos_token_id"),
            eos_token_id=c.get("eos_token_id"),
        )


Config = Olmo2Config  # the name the registry (models/__init__.py) looks for


# ---------------------------------------------------------------- the checkpoint


def expected_shapes(cfg):
    """Every tensor name the config implies, with its shape (Hugging Face's names and layout)."""
    D, F, V, Dh = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    layer = {
        "self_attn.q_proj.weight": (H * Dh, D),
        "self_attn.k_proj.weight": (Hkv * Dh, D),
        "self_attn.v_proj.weight": (Hkv * Dh, D),
        "self_attn.q_norm.weight": (H * Dh,),  # one gain per value of the whole q row, not per head
        "self_attn.k_norm.weight": (Hkv * Dh,),
        "self_attn.o_proj.weight": (D, H * Dh),
        "post_attention_layernorm.weight": (D,),
        "mlp.gate_proj.weight": (F, D),
        "mlp.up_proj.weight": (F, D),
        "mlp.down_proj.weight": (D, F),
        "post_feedforward_layernorm.weight": (D,),
    }
    if cfg.attention_bias:
        layer |= {"self_attn.q_proj.bias": (H * Dh,), "self_attn.k_proj.bias": (Hkv * Dh,),
                  "self_attn.v_proj.bias": (Hkv * Dh,), "self_attn.o_proj.bias": (D,)}
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(cfg.num_hidden_layers):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in layer.items()}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


@dataclass
class Olmo2Weights:
    embed_tokens: object  # [V, D]; None when tied: then token t's embedding is lm_head[:, t]
    layers: list  # one dict per block: "self_attn.qkv_proj.weight" -> array, ...
    norm: object  # [D]
    lm_head: object  # [D, V], transposed like every projection (see arrange_layer)
    inv_freq: object  # [Dh/2] RoPE inverse frequencies


def arrange_layer(layer):
    """One block's tensors laid out for the forward pass as in the Llama family (refimpl/layout.py):
    q, k, v stacked into self_attn.qkv_proj, gate and up into mlp.gate_up_proj, every projection
    [in, out]; the QK-norm gains as they are."""
    return transposed(stacked(layer))


def load_weights(tensors, cfg, xp):
    """The checked checkpoint tensors (name -> NumPy array, see weights.py), arranged and on the device."""
    layers = [on_device(xp, arrange_layer(take_layer(tensors, i))) for i in range(cfg.num_hidden_layers)]
    embed, lm_head = embedding_and_head(xp, tensors, cfg.tie_word_embeddings)
    inv_freq = xp.asarray(rope_inverse_frequencies(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling))
    return Olmo2Weights(embed, layers, xp.asarray(tensors.pop("model.norm.weight")), lm_head, inv_freq)


# ---------------------------------------------------------------- the forward pass


def self_attention(xp, cfg, w, layer, x, cos, sin, batch):
    """Project to q, k, v, normalise q and k as whole rows, split into heads, rotate, attend, project back."""
    N, H, Hkv, Dh = x.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv = linear(batch, x, w, "self_attn.qkv_proj", cfg.attention_bias)  # [N, (H + 2 Hkv) Dh]: q, k, v side by side
    # QK-norm: the RMS is taken over all H * Dh values of a token's q (Hkv * Dh of its k), not
    # head by head, so the heads of one token share one scale; then the heads are split off.
    q = rms_norm(xp, qkv[:, :H * Dh], w["self_attn.q_norm.weight"], cfg.rms_norm_eps)  # [N, H*Dh]
    k = rms_norm(xp, qkv[:, H * Dh:(H + Hkv) * Dh], w["self_attn.k_norm.weight"], cfg.rms_norm_eps)  # [N, Hkv*Dh]
    q = xp.reshape(q, (N, H, Dh))
    k = xp.reshape(k, (N, Hkv, Dh))
    v = xp.reshape(qkv[:, (H + Hkv) * Dh:], (N, Hkv, Dh))
    q, k = rope(xp, q, cos, sin), rope(xp, k, cos, sin)
    out = attend(xp, batch, layer, q, k, v, None)  # [N, H*Dh]; full causal attention
    return linear(batch, out, w, "self_attn.o_proj", cfg.attention_bias)  # [N, D]


def block(xp, cfg, w, layer, x, cos, sin, batch):
    """One transformer block with post-normalisation: each branch's output is normalised, not its input."""
    h = self_attention(xp, cfg, w, layer, x, cos, sin, batch)  # [N, D]
    x = x + rms_norm(xp, h, w["post_attention_layernorm.weight"], cfg.rms_norm_eps)
    h = gated_mlp(xp, batch, w, x, cfg.intermediate_size, False, silu)  # SwiGLU, never biased in OLMo 2
    return x + rms_norm(xp, h, w["post_feedforward_layernorm.weight"], cfg.rms_norm_eps)


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
