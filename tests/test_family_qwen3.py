"""Qwen3 (refimpl/models/llama.py) and Qwen3-MoE (refimpl/models/qwen3_moe.py) beyond the golden
log-probabilities: the mixture-of-experts equation against a dense reference, which layers get
experts and windows, and what is refused, by name."""

import json
import shutil

import array_api_strict
import numpy as np
import pytest
import safetensors.numpy

from refimpl.config import ConfigError
from refimpl.models import load_model
from refimpl.models.llama import Config as LlamaConfig
from refimpl.models.qwen3_moe import Config as MoeConfig
from refimpl.ops import moe_mlp, silu
from refimpl.weights import WeightsError
from refimpl.xp import namespace

from conftest import GOLDEN

QWEN3 = GOLDEN / "tiny" / "qwen3-tiny"
MOE = GOLDEN / "tiny" / "qwen3-moe-tiny"


def config_of(folder):
    return json.loads((folder / "config.json").read_text())


# ---------------------------------------------------------------- moe_mlp


def dense_reference(x, router, gate_up, down, k, renormalize):
    """Every expert on every token, in float64, weighted by a mask that is zero off the top k."""
    x, router, gate_up, down = (np.asarray(a, dtype=np.float64) for a in (x, router, gate_up, down))
    logits = x @ router  # [N, E]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]  # [N, k]
    weight = np.zeros_like(probs)
    np.put_along_axis(weight, top, np.take_along_axis(probs, top, -1), -1)
    if renormalize:
        weight /= weight.sum(-1, keepdims=True)
    F = down.shape[1]
    out = np.zeros_like(x)
    for e in range(router.shape[1]):
        g = x @ gate_up[e]
        out += weight[:, e:e + 1] * (((g[:, :F] / (1 + np.exp(-g[:, :F]))) * g[:, F:]) @ down[e])
    return out


def random_moe(seed, N=37, D=16, E=6, F=8):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((N, D)).astype(np.float32), rng.standard_normal((D, E)).astype(np.float32),
            (0.3 * rng.standard_normal((E, D, 2 * F))).astype(np.float32),
            (0.3 * rng.standard_normal((E, F, D))).astype(np.float32))


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_moe_mlp_equals_every_expert_on_every_token_masked(k, renormalize):
    x, router, gate_up, down = random_moe(k)
    xp = namespace("cpu")
    ours = moe_mlp(xp, xp.asarray(x), xp.asarray(router), xp.asarray(gate_up), xp.asarray(down), k, renormalize, silu)
    np.testing.assert_allclose(ours, dense_reference(x, router, gate_up, down, k, renormalize), rtol=1e-5, atol=1e-5)


def test_moe_mlp_renormalize_changes_the_output():
    args = random_moe(1)
    assert not np.allclose(dense_reference(*args, 2, True), dense_reference(*args, 2, False))


def test_moe_mlp_skips_unused_experts_and_stays_in_the_strict_namespace():
    x, router, gate_up, down = random_moe(5, N=1, E=8)  # one token: 6 of 8 experts get no rows
    xp = array_api_strict
    ours = moe_mlp(xp, xp.asarray(x), xp.asarray(router), xp.asarray(gate_up), xp.asarray(down), 2, True, silu)
    expected = dense_reference(x, router, gate_up, down, 2, True)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)


def test_moe_mlp_rows_do_not_depend_on_the_rest_of_the_batch():
    x, router, gate_up, down = random_moe(9)
    xp = namespace("cpu")
    w = [xp.asarray(a) for a in (router, gate_up, down)]
    together = moe_mlp(xp, xp.asarray(x), *w, 2, True, silu)
    alone = np.concatenate([moe_mlp(xp, xp.asarray(x[i:i + 1]), *w, 2, True, silu) for i in range(len(x))])
    np.testing.assert_allclose(together, alone, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- Qwen3 (the Llama file)


def test_qwen3_tiny_exercises_qk_norm_and_a_wide_head():
    cfg = load_model(QWEN3).config
    assert cfg.model_type == "qwen3" and cfg.qk_norm
    assert cfg.head_dim == 32 != cfg.hidden_size // cfg.num_attention_heads
    assert not (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias) and cfg.sliding_window is None


def test_qwen3_attention_bias_covers_q_k_v_and_o():
    cfg = LlamaConfig.from_dict(config_of(QWEN3) | {"attention_bias": True})
    assert cfg.qkv_bias and cfg.o_bias and not cfg.mlp_bias


def test_other_llama_types_have_no_qk_norm():
    for model_type in ("llama", "mistral", "qwen2"):
        assert not LlamaConfig.from_dict(config_of(QWEN3) | {"model_type": model_type}).qk_norm


WINDOW = {"sliding_window": 16, "use_sliding_window": True}


@pytest.mark.parametrize("extra, window", [
    ({}, None),  # the tiny model: use_sliding_window false, layer_types all full
    ({"sliding_window": 16}, None),  # a window that use_sliding_window does not switch on
    (WINDOW | {"layer_types": ["sliding_attention"] * 2}, 16),
    (WINDOW | {"layer_types": ["full_attention"] * 2}, None),
    # without layer_types, transformers derives them from max_window_layers (default 28)
    (WINDOW | {"layer_types": None, "max_window_layers": 0}, 16),
    (WINDOW | {"layer_types": None, "max_window_layers": 2}, None),
    (WINDOW | {"layer_types": None}, None),
])
def test_qwen3_window_follows_use_sliding_window_and_layer_types(extra, window):
    assert LlamaConfig.from_dict(config_of(QWEN3) | extra).sliding_window == window


@pytest.mark.parametrize("extra", [
    WINDOW | {"layer_types": ["full_attention", "sliding_attention"]},
    WINDOW | {"layer_types": None, "max_window_layers": 1},
])
def test_qwen3_mixed_layers_each_get_their_window(extra):
    assert LlamaConfig.from_dict(config_of(QWEN3) | extra).layer_windows == (None, 16)


@pytest.mark.parametrize("extra, named", [
    ({"sliding_window": 16, "layer_types": ["sliding_attention"] * 2}, "no sliding_window"),  # use_sliding_window off
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, "yarn"),
])
def test_qwen3_refuses_what_it_does_not_implement(extra, named):
    with pytest.raises(ConfigError, match=named):
        LlamaConfig.from_dict(config_of(QWEN3) | extra)


# ---------------------------------------------------------------- Qwen3-MoE


def test_qwen3_moe_tiny_has_both_kinds_of_block():
    cfg = load_model(MOE).config
    assert cfg.moe_layers == (0, 2) and cfg.num_hidden_layers == 3
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob) == (8, 2, True)
    assert cfg.head_dim == 32 != cfg.hidden_size // cfg.num_attention_heads


@pytest.mark.parametrize("extra, moe_layers", [
    ({"decoder_sparse_step": 1, "mlp_only_layers": []}, (0, 1, 2)),
    ({"decoder_sparse_step": 2, "mlp_only_layers": []}, (1,)),  # transformers: (i + 1) % step == 0
    ({"decoder_sparse_step": 1, "mlp_only_layers": [0, 2]}, (1,)),
    ({"num_local_experts": 0}, ()),
])
def test_qwen3_moe_layers_are_chosen_as_transformers_does(extra, moe_layers):
    assert MoeConfig.from_dict(config_of(MOE) | extra).moe_layers == moe_layers


def test_qwen3_moe_reads_num_experts_under_either_name():
    c = config_of(MOE)
    hub = {k: v for k, v in c.items() if k != "num_local_experts"} | {"num_experts": 8}
    assert MoeConfig.from_dict(hub).num_experts == MoeConfig.from_dict(c).num_experts == 8


def test_qwen3_moe_window_is_every_layer_or_none():
    c = config_of(MOE)
    assert MoeConfig.from_dict(c).sliding_window is None
    assert MoeConfig.from_dict(c | {"sliding_window": 16}).sliding_window is None
    assert MoeConfig.from_dict(c | {"sliding_window": 16, "use_sliding_window": True}).sliding_window == 16


@pytest.mark.parametrize("change, named", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"shared_expert_intermediate_size": 64}, "shared_expert_intermediate_size"),
    ({"num_local_experts": None}, "num_experts"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, "yarn"),
])
def test_qwen3_moe_refuses_what_it_does_not_implement(change, named):
    c = {k: v for k, v in (config_of(MOE) | change).items() if v is not None}
    with pytest.raises(ConfigError, match=named):
        MoeConfig.from_dict(c)


def test_qwen3_moe_refuses_a_router_bias_by_name(tmp_path):
    folder = tmp_path / "moe"
    shutil.copytree(MOE, folder)
    tensors = safetensors.numpy.load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.gate.bias"] = np.zeros(8, dtype=np.float32)
    safetensors.numpy.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="model.layers.0.mlp.gate.bias"):
        load_model(folder)
