"""The GPT-2 family: token ids in, next-token logits out.

A token meets, in order: its embedding plus a learned embedding of its position (wpe; there is
no rotary embedding); per block, LayerNorm -> attention -> residual, LayerNorm -> GELU MLP ->
residual; a final LayerNorm and the output head, which is the token embedding matrix itself.

What is new against the Llama family (refimpl/models/llama.py):
  - LayerNorm (subtract the mean, then a gain and a bias) instead of RMSNorm;
  - absolute positions: a learned [n_positions, D] table added to the input, so the context can
    never be longer than n_positions;
  - GELU with the tanh approximation, in a plain (not gated) MLP four times as wide as D;
  - q, k and v come from one fused projection, c_attn, and every projection has a bias;
  - the checkpoint stores projections as Conv1D, weight [in, out]: `x @ W` needs no transpose.

The config.json fields it reads (GPT-2's own names; the attributes the rest of refimpl reads,
such as num_hidden_layers and max_position_embeddings, are derived from them):

  n_embd, n_layer, n_head, n_inner     D, layers, H (= Hkv), F (n_inner, or 4 D when null)
  n_positions                          the context length: rows of the position table wpe
  vocab_size, layer_norm_epsilon
  activation_function                  must be "gelu_new" (the tanh approximation)
  scale_attn_weights                   must be true: scores are scaled by 1/sqrt(Dh)
  scale_attn_by_inverse_layer_idx,     must be false (not implemented)
  reorder_and_upcast_attn,
  add_cross_attention
  tie_word_embeddings                  must be true: GPT2LMHeadModel's head is wte
  bos_token_id, eos_token_id

Dimension letters as in ops.py: N tokens in this call, D width, H heads, Dh head width,
F feed-forward width, V vocabulary, P positions (n_positions), B sequences.
"""

from dataclasses import dataclass

from refimpl import layout
from refimpl.batching import Batch, attend
from refimpl.config import ConfigError
from refimpl.layout import embedding_and_head, on_device, take_layer
from refimpl.ops import gelu_tanh, layer_norm, linear

MODEL_TYPES = ("gpt2",)


# ---------------------------------------------------------------- config.json


@dataclass(frozen=True)
class GPT2Config:
    model_type: str
    vocab_size: int  # V
    hidden_size: int  # D (n_embd)
    intermediate_size: int  # F (n_inner, or 4 D)
    num_hidden_layers: int  # L (n_layer)
    num_attention_heads: int  # H (n_head)
    num_key_value_heads: int  # = H: every query head has its own keys and values
    head_dim: int  # Dh = D / H
    layer_norm_epsilon: float
    max_position_embeddings: int  # P (n_positions): the KV cache and generation read this name
    tie_word_embeddings: bool  # always True
    bos_token_id: int | None
    eos_token_id: int | list | None

    @classmethod
    def from_dict(cls, c):
        if c.get("model_type") not in MODEL_TYPES:
            raise ConfigError(f"model_type {c.get('model_type')!r} is not a GPT-2 type ({', '.join(MODEL_TYPES)})")
        if c.get("activation_function", "gelu_new") != "gelu_new":
            raise ConfigError(f"activation_function {c['activation_function']!r} is not supported (only gelu_new)")
        if not c.get("scale_attn_weights", True):
            raise ConfigError("scale_attn_weights false (unscaled attention scores) is not supported")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if c.get(flag, False):
                raise ConfigError(f"{flag} true is not supported")
        if not c.get("tie_word_embeddings", True):
            raise ConfigError("tie_word_embeddings false is not supported (GPT-2's head is its token embedding)")
        D, H = c["n_embd"], c["n_head"]
        if D % H:
            raise ConfigError(f"n_embd {D} is not a multiple of n_head {H}")
        return cls(
            model_type=c["model_type"],
            vocab_size=c["vocab_size"],
            hidden_size=D,
            intermediate_size=c.get("n_inner") or 4 * D,
            num_hidden_layers=c["n_layer"],
            num_attention_heads=H,
            num_key_value_heads=H,
            head_dim=D // H,
            layer_norm_epsilon=c["layer_norm_epsilon"],
            max_position_embeddings=c["n_positions"],
            tie_word_embeddings=True,
            bos_token_id=c.get("bos_token_id"),
            eos_token_id=c.get("eos_token_id"),
        )


Config = GPT2Config  # the name the registry (models/__init__.py) looks for


# ---------------------------------------------------------------- the checkpoint


def expected_shapes(cfg):
    """Every tensor name the config implies, with its shape, as GPT2LMHeadModel saves them.

    Conv1D weights are [in, out], the transpose of nn.Linear's. The tied head (lm_head.weight) is
    not saved. transformers 5 saves no `attn.bias` / `attn.masked_bias` mask buffers (older
    checkpoints that hold them are refused by name, as unexpected tensors).
    """
    D, F, V, P = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings
    layer = {
        "ln_1.weight": (D,), "ln_1.bias": (D,),
        "attn.c_attn.weight": (D, 3 * D), "attn.c_attn.bias": (3 * D,),  # q, k, v side by side
        "attn.c_proj.weight": (D, D), "attn.c_proj.bias": (D,),
        "ln_2.weight": (D,), "ln_2.bias": (D,),
        "mlp.c_fc.weight": (D, F), "mlp.c_fc.bias": (F,),
        "mlp.c_proj.weight": (F, D), "mlp.c_proj.bias": (D,),
    }
    shapes = {"transformer.wte.weight": (V, D), "transformer.wpe.weight": (P, D),
              "transformer.ln_f.weight": (D,), "transformer.ln_f.bias": (D,)}
    for i in range(cfg.num_hidden_layers):
        shapes |= {f"transformer.h.{i}.{name}": shape for name, shape in layer.items()}
    return shapes


@dataclass
class GPT2Weights:
    wpe: object  # [P, D] one learned vector per position
    layers: list  # one dict per block: "attn.c_attn.weight" -> array [D, 3D], ...
    ln_f: tuple  # (weight [D], bias [D])
    lm_head: object  # [D, V]: wte transposed; token t's embedding is column t


def load_weights(tensors, cfg, xp):
    """The checked checkpoint tensors (name -> NumPy array, see weights.py), on the device.

    Unlike Llama's nn.Linear [out, in] matrices, GPT-2's Conv1D weights are already [in, out],
    the layout `x @ W` reads fastest, so a block's tensors are used exactly as stored.
    """
    layers = [on_device(xp, take_layer(tensors, i, "transformer.h.{}.")) for i in range(cfg.num_hidden_layers)]
    # The head is the token embedding, kept once, as [D, V] (refimpl/layout.py).
    _, lm_head = embedding_and_head(xp, tensors, tied=True, embedding="transformer.wte.weight")
    ln_f = (xp.asarray(tensors.pop("transformer.ln_f.weight")), xp.asarray(tensors.pop("transformer.ln_f.bias")))
    return GPT2Weights(xp.asarray(tensors.pop("transformer.wpe.weight")), layers, ln_f, lm_head)


# ---------------------------------------------------------------- importing GGUF (refimpl/gguf_import.py)

# GGUF tensor name -> HF tensor name (GPT2LMHeadModel's). Per-block names are "blk.{i}." + key.
# There is no output.weight: the converter writes none, as the head is wte itself.
GLOBAL_NAMES = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
}
BLOCK_NAMES = {
    "attn_norm.weight": "ln_1.weight", "attn_norm.bias": "ln_1.bias",
    "attn_qkv.weight": "attn.c_attn.weight", "attn_qkv.bias": "attn.c_attn.bias",  # q, k, v side by side
    "attn_output.weight": "attn.c_proj.weight", "attn_output.bias": "attn.c_proj.bias",
    "ffn_norm.weight": "ln_2.weight", "ffn_norm.bias": "ln_2.bias",
    "ffn_up.weight": "mlp.c_fc.weight", "ffn_up.bias": "mlp.c_fc.bias",
    "ffn_down.weight": "mlp.c_proj.weight", "ffn_down.bias": "mlp.c_proj.bias",
}
# llama.cpp's converter (GPT2Model.modify_tensors) transposes these Conv1D weights from HF's
# [in, out] to the [out, in] of every other llama.cpp matrix; we transpose them back.
CONV1D_WEIGHTS = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")


def gguf_config(meta, tensor_names):
    """config.json as HF's GPT2Config writes it, from a GGUF file's metadata (arch "gpt2")."""
    hidden = meta["gpt2.embedding_length"]
    ffn = meta.get("gpt2.feed_forward_length", 4 * hidden)
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": hidden,
        "n_layer": meta["gpt2.block_count"],
        "n_head": meta["gpt2.attention.head_count"],
        "n_inner": None if ffn == 4 * hidden else ffn,  # null: GPT-2's own 4 D
        # The converter writes config.json's n_ctx here, which GPT-2 checkpoints set equal to
        # n_positions, the rows of the position table.
        "n_positions": meta["gpt2.context_length"],
        "vocab_size": meta.get("gpt2.vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "layer_norm_epsilon": meta["gpt2.attention.layer_norm_epsilon"],
        "activation_function": "gelu_new",
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if "tokenizer.ggml.padding_token_id" in meta:
        config["pad_token_id"] = meta["tokenizer.ggml.padding_token_id"]
    return config


def hf_name(gguf_name):
    """The HF name of a GGUF tensor; an error that names it if we do not know it."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    prefix, _, rest = gguf_name.partition(".")
    block, _, key = rest.partition(".")
    if prefix == "blk" and block.isdigit() and key in BLOCK_NAMES:
        return f"transformer.h.{block}.{BLOCK_NAMES[key]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no GPT-2 counterpart in the HF layout")


def gguf_tensors(gguf_name, w, config):
    """The HF tensor of one dequantized GGUF tensor: renamed, Conv1D weights back to [in, out]."""
    name = hf_name(gguf_name)
    if gguf_name.endswith(CONV1D_WEIGHTS):
        w = w.T  # [out, in] -> [in, out]
    yield name, w


# ---------------------------------------------------------------- the forward pass


def embed(xp, W, ids, positions):
    """Token embedding plus position embedding: ids, positions [N] -> [N, D]."""
    tokens = layout.embed(xp, None, W.lm_head, ids)  # [N, D]: columns of the tied head
    return tokens + xp.take(W.wpe, positions, axis=0)  # [N, D]


def self_attention(xp, cfg, w, layer, x, batch):
    """Project to q, k, v with one fused matrix, attend over each sequence's cache, project back."""
    N, H, Dh = x.shape[0], cfg.num_attention_heads, cfg.head_dim
    qkv = linear(batch, x, w, "attn.c_attn", True)  # [N, 3 H Dh]: q, k, v side by side
    q = xp.reshape(qkv[:, :H * Dh], (N, H, Dh))
    k = xp.reshape(qkv[:, H * Dh:2 * H * Dh], (N, H, Dh))
    v = xp.reshape(qkv[:, 2 * H * Dh:], (N, H, Dh))
    out = attend(xp, batch, layer, q, k, v, None)  # [N, H*Dh]; full causal attention, scaled by 1/sqrt(Dh)
    return linear(batch, out, w, "attn.c_proj", True)  # [N, D]


def mlp(xp, w, x, batch):
    """The plain (ungated) MLP: c_proj(gelu(c_fc(x)))."""
    h = gelu_tanh(xp, linear(batch, x, w, "mlp.c_fc", True))  # [N, F]
    return linear(batch, h, w, "mlp.c_proj", True)  # [N, D]


def block(xp, cfg, w, layer, x, batch):
    """One transformer block with pre-normalisation and residual connections."""
    eps = cfg.layer_norm_epsilon
    x = x + self_attention(xp, cfg, w, layer, layer_norm(xp, x, w["ln_1.weight"], w["ln_1.bias"], eps), batch)
    return x + mlp(xp, w, layer_norm(xp, x, w["ln_2.weight"], w["ln_2.bias"], eps), batch)


def forward(model, tokens, caches, all_logits=False):
    """Run new tokens of one or more sequences through the model, extending their caches.

    tokens: one list of token ids per sequence; caches: that sequence's KVCache, whose `length`
    says how many positions came before. Returns logits [B, V] for the last token of each
    sequence, or [N, V] for every token when `all_logits` (scoring a prompt); a list of bools
    asks per sequence, rows in sequence order (Batch.logits).
    """
    xp, cfg, W = model.xp, model.config, model.weights
    for seq, cache in zip(tokens, caches):  # wpe has no row for a later position
        if cache.length + len(seq) > cfg.max_position_embeddings:
            raise ValueError(f"position {cache.length + len(seq) - 1} is past GPT-2's n_positions "
                             f"({cfg.max_position_embeddings})")
    batch = Batch.of(xp, tokens, caches)

    x = embed(xp, W, batch.ids, batch.positions)  # [N, D]
    batch.record(0, x)  # the residual stream before the blocks, kept only by an inspected sequence (inspection.py)
    for layer, w in enumerate(W.layers):
        x = block(xp, cfg, w, layer, x, batch)
        batch.record(layer + 1, x)  # and after each block
    batch.advance()

    # Each sequence's last position predicts its next token; scoring a prompt wants every position's.
    return batch.logits(layer_norm(xp, x, *W.ln_f, cfg.layer_norm_epsilon), W.lm_head, all_logits)  # [B, V] or [N, V]


def output_logits(model, x):
    """The final norm and the output head on residual-stream rows x [N, D]: logits [N, V], what the
    model would predict if the blocks ended there. forward applies the same steps to the rows that
    predict (Batch.logits); the logit lens (inspection.py) applies them to every layer's rows."""
    xp, cfg, W = model.xp, model.config, model.weights
    return layer_norm(xp, x, *W.ln_f, cfg.layer_norm_epsilon) @ W.lm_head  # [N, V]
