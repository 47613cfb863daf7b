"""Phi-3 (refimpl/models/phi3.py) beyond the golden log-probabilities: how config.json's RoPE
fields are read (as transformers' Phi3Config reads them), LongRoPE's frequencies and its rule for
choosing the long factors, and what the family refuses, by name."""

import json
import math

import numpy as np
import pytest

from refimpl.config import ConfigError
from refimpl.models import forward, load_model
from refimpl.models.phi3 import Config, longrope_inverse_frequencies, uses_long_factors
from refimpl.sampling import log_softmax
from refimpl.xp import to_numpy

from conftest import GOLDEN, load_golden

LONGROPE = GOLDEN / "tiny" / "phi3-longrope-tiny"


def config_of(name):
    return json.loads((GOLDEN / "tiny" / name / "config.json").read_text())


def test_config_reads_the_flags():
    plain, longrope = Config.from_dict(config_of("phi3-tiny")), Config.from_dict(config_of("phi3-longrope-tiny"))
    assert (plain.sliding_window, plain.longrope, plain.rotary_dim, plain.tie_word_embeddings) == (24, None, 16, False)
    assert (longrope.sliding_window, longrope.rotary_dim, longrope.tie_word_embeddings) == (None, 12, True)
    assert longrope.longrope["original_max_position_embeddings"] == 40
    # factor = 512 / 40 = 12.8: sqrt(1 + ln 12.8 / ln 40)
    assert longrope.longrope["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(12.8) / math.log(40)))


def test_phi3_mini_128k_style_config():
    """The classic spelling (Phi-3-mini-128k-instruct): rope_scaling with type "longrope", and the
    pretraining length at the top level, which wins over one inside rope_scaling (transformers does so)."""
    c = config_of("phi3-tiny") | {
        "rope_parameters": None, "rope_theta": 10000.0, "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                         "original_max_position_embeddings": 99},
    }
    cfg = Config.from_dict(c)
    assert cfg.longrope["original_max_position_embeddings"] == 4096
    assert cfg.longrope["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    assert Config.from_dict(c | {"rope_scaling": {**c["rope_scaling"], "type": "su"}}).longrope == cfg.longrope
    # Without a top-level value, transformers' default of 4096 applies, not rope_scaling's 99.
    del c["original_max_position_embeddings"]
    assert Config.from_dict(c).longrope["original_max_position_embeddings"] == 4096


def test_explicit_factor_and_attention_factor():
    c = config_of("phi3-longrope-tiny")
    rope = c["rope_parameters"]
    assert Config.from_dict(c | {"rope_parameters": rope | {"attention_factor": 1.5}}).longrope["attention_factor"] == 1.5
    scaled = Config.from_dict(c | {"rope_parameters": rope | {"factor": 4.0}}).longrope["attention_factor"]
    assert scaled == pytest.approx(math.sqrt(1 + math.log(4.0) / math.log(40)))


def test_longrope_inverse_frequencies():
    """1 / (factor_i * theta^(2i/R)), to float32 rounding."""
    factors = [1.0, 1.5, 3.0, 6.0, 10.0, 16.0]
    ours = longrope_inverse_frequencies(10000.0, 12, factors)
    exact = 1.0 / (np.asarray(factors) * 10000.0 ** (np.arange(0, 12, 2) / 12))
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, exact, rtol=3e-7, atol=0)


def test_long_factors_are_chosen_by_the_sequences_capacity():
    """One rule per sequence, by the most positions its cache may hold: a short prompt whose
    generation may run past original_max_position_embeddings (40) is rotated with the long
    factors from its first token, so its keys never mix the two rotations."""
    model = load_model(LONGROPE)
    assert not uses_long_factors(model.config, 40) and uses_long_factors(model.config, 41)
    ids = load_golden("tiny/phi3-longrope-tiny/reference.json")["cases"][0]["input_ids"][:20]
    short = to_numpy(forward(model, [ids], [model.new_cache(40)], all_logits=True))
    long_ = to_numpy(forward(model, [ids], [model.new_cache(41)], all_logits=True))
    assert np.abs(short - long_).max() > 1e-2
    # In one batch, each sequence keeps its own choice.
    both = to_numpy(forward(model, [ids, ids], [model.new_cache(40), model.new_cache(41)]))
    np.testing.assert_allclose(both, np.stack([short[-1], long_[-1]]), rtol=0, atol=1e-4)


def test_batched_prefill_equals_one_at_a_time():
    """Short and long sequences, windowed or not, in one call give what each gives alone."""
    for name in ("phi3-tiny", "phi3-longrope-tiny"):
        model = load_model(GOLDEN / "tiny" / name)
        prompts = [c["input_ids"] for c in load_golden(f"tiny/{name}/reference.json")["cases"]]
        alone = [to_numpy(log_softmax(model.xp, forward(model, [ids], [model.new_cache(len(ids))])))[0]
                 for ids in prompts]
        together = forward(model, prompts, [model.new_cache(len(ids)) for ids in prompts])
        np.testing.assert_allclose(to_numpy(log_softmax(model.xp, together)), np.stack(alone), rtol=0, atol=1e-4)


@pytest.mark.parametrize("change, named", [
    ({"hidden_act": "gelu_new"}, "hidden_act 'gelu_new'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "'llama3'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                          "long_factor": [1.0] * 8, "short_mscale": 1.1}}, "short_mscale"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 7,
                          "long_factor": [1.0] * 8}}, "short_factor"),
    ({"partial_rotary_factor": 0.35}, "partial_rotary_factor"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
])
def test_unsupported_flags_are_refused_by_name(change, named):
    c = config_of("phi3-tiny") | change
    if "partial_rotary_factor" in change:
        c["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4}  # the top-level key then applies
    with pytest.raises(ConfigError, match=named):
        Config.from_dict(c)
