"""GPT-2 (refimpl/models/gpt2.py) beyond the golden log-probabilities: what it refuses, by name."""

import json
import shutil

import pytest
import safetensors.numpy

from refimpl.config import ConfigError
from refimpl.models import forward, load_model
from refimpl.models.gpt2 import Config
from refimpl.weights import WeightsError

from conftest import GOLDEN

TINY = GOLDEN / "tiny" / "gpt2-tiny"


def tiny_config():
    return json.loads((TINY / "config.json").read_text())


def test_config_reads_gpt2_names_into_the_attributes_refimpl_uses():
    cfg = Config.from_dict(tiny_config())
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 4)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (4, 16, 256)  # n_inner null: 4 D
    assert cfg.max_position_embeddings == 512 and cfg.tie_word_embeddings


@pytest.mark.parametrize("change, named", [
    ({"activation_function": "gelu"}, "activation_function 'gelu'"),
    ({"activation_function": "relu"}, "activation_function 'relu'"),
    ({"scale_attn_weights": False}, "scale_attn_weights"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
    ({"add_cross_attention": True}, "add_cross_attention"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings"),
])
def test_unsupported_flags_are_refused_by_name(change, named):
    with pytest.raises(ConfigError, match=named):
        Config.from_dict(tiny_config() | change)


def test_positions_past_n_positions_are_refused():
    model = load_model(TINY)
    cache = model.new_cache(600)
    forward(model, [[1] * 512], [cache])  # positions 0..511: the whole table
    with pytest.raises(ValueError, match="n_positions"):
        forward(model, [[1]], [cache])  # position 512 has no embedding


def test_a_checkpoint_with_attention_mask_buffers_is_refused(tmp_path):
    """Older GPT-2 checkpoints also hold each block's causal-mask buffer attn.bias: not a weight."""
    shutil.copy(TINY / "config.json", tmp_path / "config.json")
    tensors = safetensors.numpy.load_file(TINY / "model.safetensors")
    tensors["transformer.h.0.attn.bias"] = tensors["transformer.h.0.ln_1.bias"]
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match="transformer.h.0.attn.bias"):
        load_model(tmp_path)
