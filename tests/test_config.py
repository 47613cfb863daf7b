"""The Llama family's config (LlamaConfig.from_dict): the flags read from config.json, and what is refused;
the registry's choice of family by model_type; RoPE inverse frequencies."""

from decimal import Decimal, localcontext

import numpy as np
import pytest

from refimpl.config import ConfigError
from refimpl.models import FAMILIES, family_of
from refimpl.models.llama import LlamaConfig as ModelConfig
from refimpl.ops import rope_inverse_frequencies

from conftest import load_golden

BASE = dict(model_type="llama", vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=131072)
# Llama 3.1's own values: with head_dim 128 they put frequencies in all three regimes
# (kept, divided by `factor`, smoothly blended).
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("rope_keys", [
    {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3}},  # transformers 4
    {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **LLAMA3}},  # older key for the type
    {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", **LLAMA3}},  # transformers 5
], ids=["rope_scaling", "rope_scaling-type", "rope_parameters"])
def test_llama3_rope_read_from_every_form(rope_keys):
    cfg = ModelConfig.from_dict(BASE | rope_keys)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == {"rope_type": "llama3", **LLAMA3}


@pytest.mark.parametrize("rope_keys, theta", [
    ({"rope_theta": 1e6}, 1e6),
    ({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}, 1e6),
    ({}, 10000.0),  # Llama's default base when config.json says nothing
], ids=["rope_theta", "rope_parameters", "absent"])
def test_plain_rope_has_no_scaling(rope_keys, theta):
    cfg = ModelConfig.from_dict(BASE | rope_keys)
    assert (cfg.rope_theta, cfg.rope_scaling) == (theta, None)


@pytest.mark.parametrize("model_type, extra, qkv_bias, o_bias", [
    ("qwen2", {}, True, False),  # Qwen2 always has q/k/v biases, never an o bias
    ("llama", {}, False, False),
    ("llama", {"attention_bias": True}, True, True),
    ("mistral", {}, False, False),
])
def test_attention_biases(model_type, extra, qkv_bias, o_bias):
    cfg = ModelConfig.from_dict(BASE | {"model_type": model_type} | extra)
    assert (cfg.qkv_bias, cfg.o_bias) == (qkv_bias, o_bias)


def test_qwen2_unused_window_is_dropped_mistral_keeps_its_own():
    qwen2 = ModelConfig.from_dict(BASE | {"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False})
    mistral = ModelConfig.from_dict(BASE | {"model_type": "mistral", "sliding_window": 4096})
    assert qwen2.sliding_window is None
    assert mistral.sliding_window == 4096


@pytest.mark.parametrize("extra, window", [
    ({}, None),  # transformers' Qwen2Config defaults use_sliding_window to False
    ({"use_sliding_window": True, "max_window_layers": 0}, 4096),  # every layer slides
    ({"use_sliding_window": True, "max_window_layers": 2}, None),  # sliding starts after the last layer
])
def test_qwen2_window_follows_use_sliding_window_and_max_window_layers(extra, window):
    cfg = ModelConfig.from_dict(BASE | {"model_type": "qwen2", "sliding_window": 4096} | extra)
    assert cfg.sliding_window == window


@pytest.mark.parametrize("extra", [
    {"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 1},  # layers 1.. slide
    {"model_type": "mistral", "layer_types": ["full_attention", "sliding_attention"]},
])
def test_mixed_full_and_sliding_layers_each_get_their_window(extra):
    cfg = ModelConfig.from_dict(BASE | {"sliding_window": 4096} | extra)
    assert cfg.layer_windows == (None, 4096) and cfg.sliding_window == 4096


@pytest.mark.parametrize("layer_types", [["full_attention"], ["full_attention", "chunked_attention"]])
def test_layer_types_that_do_not_fit_are_refused(layer_types):
    with pytest.raises(ConfigError, match="layer_types"):
        ModelConfig.from_dict(BASE | {"model_type": "mistral", "sliding_window": 16, "layer_types": layer_types})


def test_head_dim_defaults_to_width_over_heads_unless_given():
    assert ModelConfig.from_dict(BASE).head_dim == 64 // 4
    assert ModelConfig.from_dict(BASE | {"head_dim": 32}).head_dim == 32


@pytest.mark.parametrize("change, value", [
    ({"model_type": "gemma"}, "gemma"),
    ({"hidden_act": "gelu_pytorch_tanh"}, "gelu_pytorch_tanh"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "linear", "factor": 2.0}}, "linear"),
], ids=["model_type", "hidden_act", "rope_scaling", "rope_parameters"])
def test_unsupported_values_are_refused_by_name(change, value):
    with pytest.raises(ConfigError, match=f"'{value}'"):
        ModelConfig.from_dict(BASE | change)


# ULP bounds against transformers. Plain: ours are correctly rounded, torch's float32 pow is within
# 1 ULP and its reciprocal rounds again, so 2 ULP (1 measured). llama3: the same float32 blend in
# both, which magnifies a 1-ULP difference in its input up to 4 ULP (3 measured).
@pytest.mark.parametrize("index, max_ulp", [(0, 2), (1, 4)], ids=["default", "llama3"])
def test_rope_inverse_frequencies_match_transformers(index, max_ulp):
    """Within max_ulp of transformers' float32 values (golden/rope_inverse_frequencies.json)."""
    case = load_golden("rope_inverse_frequencies.json")["cases"][index]
    cfg = ModelConfig.from_dict(case["config"])
    ours = rope_inverse_frequencies(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling)
    assert ours.dtype == np.float32
    theirs = np.array(case["inv_freq_float32_bits"], dtype=np.uint32)
    # Positive floats are ordered like their bit patterns: the integer difference counts ULPs.
    ulps = np.abs(ours.view(np.uint32).astype(np.int64) - theirs.astype(np.int64))
    worst = int(np.argmax(ulps))
    assert ulps[worst] <= max_ulp, (f"{ulps[worst]} ULP apart at index {worst} ({ours[worst]!r} vs "
                                    f"{theirs.view(np.float32)[worst]!r}); regenerate with `make golden`")


@pytest.mark.parametrize("theta, dim", [(500000.0, 128), (10000.0, 80), (1e6, 96)])
def test_rope_inverse_frequencies_are_correctly_rounded(theta, dim):
    """Each is the float32 nearest to theta^-e (e the float32 exponent), so no CPU's pow can change it."""
    ours = rope_inverse_frequencies(theta, dim)
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    with localcontext() as ctx:
        ctx.prec = 40  # far past float64's 17 digits
        for f, e in zip(ours, exponents):
            exact = 1 / Decimal(theta) ** Decimal(float(e))
            neighbours = [f, np.nextafter(f, np.float32(0)), np.nextafter(f, np.float32(np.inf))]
            assert min(neighbours, key=lambda c: abs(Decimal(float(c)) - exact)) == f, (f, exact)


def test_every_family_module_serves_the_model_types_the_registry_gives_it():
    import importlib
    import pkgutil

    import refimpl.models

    for info in pkgutil.iter_modules(refimpl.models.__path__):
        family = importlib.import_module(f"refimpl.models.{info.name}")
        assert sorted(family.MODEL_TYPES) == sorted(t for t, m in FAMILIES.items() if m == info.name), info.name


def test_the_family_is_chosen_by_model_type_alone_and_unknown_types_are_refused_by_name():
    assert all(family_of({"model_type": t}).__name__ == "refimpl.models.llama" for t in ("llama", "mistral", "qwen2"))
    with pytest.raises(ConfigError, match="'mamba'"):
        family_of({"model_type": "mamba", "architectures": ["LlamaForCausalLM"]})
