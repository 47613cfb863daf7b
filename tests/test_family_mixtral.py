"""Mixtral (refimpl/models/mixtral.py) beyond the golden log-probabilities: the mixture of experts
against a plain dense reference, sequences batched together, and what it refuses, by name."""

import json

import numpy as np
import pytest

from refimpl.config import ConfigError
from refimpl.models import forward, load_model
from refimpl.models.mixtral import Config
from refimpl.ops import moe_mlp, silu
from refimpl.sampling import log_softmax
from refimpl.xp import to_numpy

from conftest import GOLDEN, load_golden

TINY = GOLDEN / "tiny" / "mixtral-tiny"


def tiny_config():
    return json.loads((TINY / "config.json").read_text())


def dense_mixture(cfg, w, x):
    """The mixture the slow, obvious way: every expert on every token, zero weight for the
    experts a token did not choose (float64)."""
    x = np.asarray(x, dtype=np.float64)
    logits = x @ np.asarray(w["block_sparse_moe.gate.weight"])  # [N, E]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1)[:, :cfg.num_experts_per_tok]  # [N, k]
    mix = np.zeros_like(probs)
    np.put_along_axis(mix, top, np.take_along_axis(probs, top, -1), -1)
    mix /= mix.sum(-1, keepdims=True)  # [N, E]: k nonzero weights per row, summing to 1
    F, out = cfg.intermediate_size, np.zeros_like(x)
    for e in range(cfg.num_local_experts):
        g = x @ np.asarray(w["block_sparse_moe.experts.gate_up_proj"][e])  # [N, 2F]
        y = (g[:, :F] / (1 + np.exp(-g[:, :F])) * g[:, F:]) @ np.asarray(w["block_sparse_moe.experts.down_proj"][e])
        out += mix[:, e:e + 1] * y
    return out


@pytest.mark.parametrize("rows", [1, 2, 7, 64])
def test_moe_mlp_equals_the_dense_mixture(rows):
    model = load_model(TINY)
    w = model.weights.layers[1]
    x = np.random.default_rng(rows).standard_normal((rows, model.config.hidden_size)).astype(np.float32)
    ours = to_numpy(moe_mlp(model.xp, model.xp.asarray(x), w["block_sparse_moe.gate.weight"],
                            w["block_sparse_moe.experts.gate_up_proj"], w["block_sparse_moe.experts.down_proj"],
                            model.config.num_experts_per_tok, True, silu))
    np.testing.assert_allclose(ours, dense_mixture(model.config, w, x), rtol=0, atol=1e-5)


def test_batched_forward_equals_one_at_a_time():
    """Tokens of several sequences share each expert's product; each still gets what it gets alone."""
    model = load_model(TINY)
    prompts = [c["input_ids"] for c in load_golden("tiny/mixtral-tiny/reference.json")["cases"]]
    alone = []
    for ids in prompts:
        logits = forward(model, [ids], [model.new_cache(len(ids))], all_logits=True)
        alone.append(to_numpy(log_softmax(model.xp, logits))[-1])
    caches = [model.new_cache(len(ids) + 1) for ids in prompts]
    together = to_numpy(log_softmax(model.xp, forward(model, prompts, caches)))
    np.testing.assert_allclose(together, np.stack(alone), rtol=0, atol=1e-4)
    # Then every sequence decodes one token in the same call.
    step = to_numpy(log_softmax(model.xp, forward(model, [[7]] * len(prompts), caches)))
    for ids, row in zip(prompts, step):
        logits = forward(model, [ids + [7]], [model.new_cache(len(ids) + 1)])
        np.testing.assert_allclose(row, to_numpy(log_softmax(model.xp, logits))[0], rtol=0, atol=1e-4)


def test_config_reads_the_expert_counts_and_the_window():
    cfg = Config.from_dict(tiny_config())
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size) == (4, 2, 64)
    assert cfg.sliding_window == 32 and cfg.head_dim == 16
    assert Config.from_dict(tiny_config() | {"sliding_window": None}).sliding_window is None
    full = {"layer_types": ["full_attention"] * 2}
    assert Config.from_dict(tiny_config() | full).sliding_window is None


@pytest.mark.parametrize("change, named", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok 5"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "yarn"),
])
def test_unsupported_flags_are_refused_by_name(change, named):
    with pytest.raises(ConfigError, match=named):
        Config.from_dict(tiny_config() | change)
