"""The model's hyper-parameters and architecture flags, read from an HF config.json.

Everything that differs between the supported architectures is a named field here, read from
the config, never guessed from a file name:

  model_type            llama | mistral | qwen2 (the Llama family; anything else is refused)
  qkv_bias              biases on q/k/v projections: `attention_bias` (Llama), always for Qwen2
  o_bias                bias on the output projection: `attention_bias` (Llama only)
  mlp_bias              biases on gate/up/down projections (`mlp_bias`, Llama)
  tie_word_embeddings   the output head reuses the token embedding matrix
  sliding_window        each token attends to at most this many keys (Mistral; Qwen2 only when
                        `use_sliding_window` is true); None means full causal attention
  rope_scaling          None, or the llama3 frequency rescaling (Llama 3.1+)
"""

import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class ConfigError(ValueError):
    """config.json asks for something this implementation does not do."""


@dataclass(frozen=True)
class ModelConfig:
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
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_id: int | list | None

    @classmethod
    def from_dict(cls, c):
        model_type = c.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if c.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {c['hidden_act']!r} is not supported (only silu)")
        rope_theta, rope_scaling = _rope(c)
        heads = c["num_attention_heads"]
        attention_bias = bool(c.get("attention_bias", False))
        window = _sliding_window(c, model_type)
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
            o_bias=attention_bias and model_type == "llama",
            mlp_bias=bool(c.get("mlp_bias", False)),
            sliding_window=window,
            bos_token_id=c.get("bos_token_id"),
            eos_token_id=c.get("eos_token_id"),
        )

    @classmethod
    def from_dir(cls, path):
        return cls.from_dict(json.loads((Path(path) / "config.json").read_text()))


def _sliding_window(c, model_type):
    """The attention window shared by every layer, or None for full causal attention."""
    window = c.get("sliding_window")
    if model_type == "qwen2" and not c.get("use_sliding_window", False):
        window = None  # Qwen2 configs carry a window that is used only when use_sliding_window is set
    if model_type == "qwen2" and window is not None:
        # Qwen2 slides the window only in layers from max_window_layers on.
        first = c.get("max_window_layers", 0)
        if first >= c["num_hidden_layers"]:
            window = None
        elif first > 0:
            raise ConfigError("Qwen2 with sliding attention in only some layers (max_window_layers) is not supported")
    kinds = set(c.get("layer_types") or [])
    if len(kinds) > 1:
        raise ConfigError(f"layers of different attention kinds {sorted(kinds)} (layer_types) are not supported")
    if kinds == {"full_attention"}:
        window = None
    return window


def _rope(c):
    """rope_theta and rope_scaling, from either the classic keys or transformers 5's `rope_parameters`."""
    params = dict(c.get("rope_parameters") or {})
    if "rope_theta" in c:
        params.setdefault("rope_theta", c["rope_theta"])
    if c.get("rope_scaling"):
        params.update(c["rope_scaling"])
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", 10000.0))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return theta, {"rope_type": "llama3", **{k: params[k] for k in keys}}
    raise ConfigError(f"rope scaling {rope_type!r} is not supported (supported: default, llama3)")
