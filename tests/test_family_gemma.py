"""The Gemma family (refimpl/models/gemma.py): the config flags read from config.json in both
transformers 4's and 5's forms, what is refused, and the attention's scale and soft cap.

Log-probabilities against transformers are in test_model_golden.py (gemma2-tiny, gemma3-tiny).
"""

import math

import numpy as np
import pytest

from refimpl.config import ConfigError
from refimpl.models import family_of
from refimpl.models.gemma import GemmaConfig, inverse_frequencies
from refimpl.ops import attention, rope_inverse_frequencies

BASE = dict(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, query_pre_attn_scalar=24)


def test_registry_serves_both_gemmas():
    assert family_of({"model_type": "gemma2"}).__name__ == "refimpl.models.gemma"
    assert family_of({"model_type": "gemma3_text"}).__name__ == "refimpl.models.gemma"


def test_gemma2_defaults_as_transformers():
    cfg = GemmaConfig.from_dict(BASE | {"model_type": "gemma2", "rope_theta": 10000.0})
    assert cfg.attn_logit_softcapping == 50.0 and cfg.final_logit_softcapping == 30.0
    assert cfg.layer_types == ("sliding_attention", "full_attention") * 3  # alternate, local first
    assert cfg.tie_word_embeddings and not cfg.qk_norm
    assert cfg.rope == {"sliding_attention": (10000.0, None), "full_attention": (10000.0, None)}


@pytest.mark.parametrize("rope_keys", [
    {"rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    {"rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"type": "linear", "factor": 8.0}},
    {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
], ids=["transformers4", "transformers4-type", "transformers5"])
def test_gemma3_rope_read_from_every_form(rope_keys):
    cfg = GemmaConfig.from_dict(BASE | {"model_type": "gemma3_text"} | rope_keys)
    assert cfg.rope == {"sliding_attention": (1e4, None), "full_attention": (1e6, 8.0)}
    assert cfg.layer_types == ("sliding_attention",) * 5 + ("full_attention",)  # one global layer in six
    assert cfg.qk_norm and cfg.attn_logit_softcapping is None and cfg.final_logit_softcapping is None


def test_linear_scaling_divides_every_frequency():
    plain = rope_inverse_frequencies(1e6, 32)
    assert np.array_equal(inverse_frequencies(1e6, 8.0, 32), plain / np.float32(8.0))
    assert np.array_equal(inverse_frequencies(1e6, None, 32), plain)


@pytest.mark.parametrize("keys, named", [
    ({"model_type": "gemma2", "hidden_activation": "gelu"}, "hidden_activation"),
    ({"model_type": "gemma2", "attention_bias": True}, "attention_bias"),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"model_type": "gemma3_text", "attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"model_type": "gemma3_text", "rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, "yarn"),
    ({"model_type": "gemma2", "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}}, "dynamic"),
    ({"model_type": "gemma2", "layer_types": ["full_attention"] * 5}, "layer_types"),
    ({"model_type": "gemma2", "layer_types": ["chunked_attention"] * 6}, "layer_types"),
    ({"model_type": "gemma", "hidden_activation": "gelu"}, "gemma"),
])
def test_unsupported_flags_are_refused_by_name(keys, named):
    with pytest.raises(ConfigError, match=named):
        GemmaConfig.from_dict(BASE | keys)


def naive_attention(q, k, v, scale, cap, window):
    """Textbook causal attention with transformers' order: scale, cap, mask, softmax. q [T, H, Dh]."""
    T, H, Dh = q.shape
    G = H // k.shape[0]
    out = np.zeros((T, H, Dh))
    for h in range(H):
        scores = (q[:, h, :] @ k[h // G].T) * scale  # [T, S]
        if cap is not None:
            scores = cap * np.tanh(scores / cap)
        i, j = np.arange(T)[:, None], np.arange(T)[None, :]
        scores = np.where((j <= i) & ((window is None) | (i - j < (window or 0))), scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, h, :] = (weights / weights.sum(-1, keepdims=True)) @ v[h // G]
    return out.reshape(T, H * Dh)


@pytest.mark.parametrize("window", [None, 5])
def test_attention_scale_and_soft_cap(window):
    rng = np.random.default_rng(0)
    T, H, Hkv, Dh = 20, 4, 2, 8
    q = rng.normal(0, 3, (T, H, Dh)).astype(np.float32)
    k, v = rng.normal(0, 3, (2, Hkv, T, Dh)).astype(np.float32)
    scale, cap = 24 ** -0.5, 5.0
    ours = attention(np, q, k, v, 0, window, scale=scale, softcap=cap)
    np.testing.assert_allclose(ours, naive_attention(q, k, v, scale, cap, window), atol=2e-5)
    # The cap is reached here: without it the output is different.
    assert np.abs(attention(np, q, k, v, 0, window, scale=scale) - ours).max() > 0.1
    # The defaults are plain 1/sqrt(Dh) attention, uncapped.
    plain = attention(np, q, k, v, 0, window)
    np.testing.assert_allclose(plain, naive_attention(q, k, v, 1 / math.sqrt(Dh), None, window), atol=2e-5)
    # A query on its own (decoding) gets the same bits as inside the whole prompt (ops.KEY_BLOCK).
    for t in (10, T - 1):
        alone = attention(np, q[t:t + 1], k, v, t, window, scale=scale, softcap=cap)
        assert np.array_equal(alone[0], ours[t])
