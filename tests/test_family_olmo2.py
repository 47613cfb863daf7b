"""OLMo 2 (refimpl/models/olmo2.py) beyond the golden log-probabilities: sequences batched
together, and what it refuses, by name."""

import json

import numpy as np
import pytest

from refimpl.config import ConfigError
from refimpl.models import forward, load_model
from refimpl.models.olmo2 import Config
from refimpl.sampling import log_softmax
from refimpl.xp import to_numpy

from conftest import GOLDEN, load_golden

TINY = GOLDEN / "tiny" / "olmo2-tiny"


def tiny_config():
    return json.loads((TINY / "config.json").read_text())


def test_batched_forward_equals_one_at_a_time():
    """QK-norm and the post-norms work row by row: a batch gives each sequence what it gets alone."""
    model = load_model(TINY)
    prompts = [c["input_ids"] for c in load_golden("tiny/olmo2-tiny/reference.json")["cases"]]
    alone = []
    for ids in prompts:
        logits = forward(model, [ids], [model.new_cache(len(ids))], all_logits=True)
        alone.append(to_numpy(log_softmax(model.xp, logits))[-1])
    caches = [model.new_cache(len(ids)) for ids in prompts]
    together = to_numpy(log_softmax(model.xp, forward(model, prompts, caches)))
    np.testing.assert_allclose(together, np.stack(alone), rtol=0, atol=1e-4)


def test_config_reads_the_flags():
    cfg = Config.from_dict(tiny_config())
    assert cfg.attention_bias and not cfg.tie_word_embeddings
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)


@pytest.mark.parametrize("change, named", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"sliding_window": 16}, "sliding_window"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "yarn"),
])
def test_unsupported_flags_are_refused_by_name(change, named):
    with pytest.raises(ConfigError, match=named):
        Config.from_dict(tiny_config() | change)
