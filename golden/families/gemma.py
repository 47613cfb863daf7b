"""Tiny Gemma 2 and Gemma 3 (text) models for refimpl/models/gemma.py.

Both have head_dim 32 != hidden / heads = 16, query_pre_attn_scalar != head_dim, sliding layers
with a window of 16 (shorter than the prompts, 48-64 tokens) among full ones, and soft caps low
enough that the re-drawn weights reach them: check() turns each feature off in a copy of the
model and asserts that the output changes where it should.
"""

import json

import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig

TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=128,
            max_position_embeddings=512, sliding_window=16)
LAYERS = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

MODELS = {
    "gemma2-tiny": (Gemma2Config(
        **TINY, vocab_size=384, num_hidden_layers=4, layer_types=LAYERS, rope_theta=10000.0,
        query_pre_attn_scalar=24, attn_logit_softcapping=10.0, final_logit_softcapping=8.0,
        tie_word_embeddings=False,  # Gemma's default is tied: gemma3-tiny covers that
    ), torch.float32, 5000),
    "gemma3-tiny": (Gemma3TextConfig(
        **TINY, vocab_size=448, num_hidden_layers=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        # Global layers: theta 100000, stretched by 8 (linear); local layers: their own theta.
        rope_theta=100000.0, rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_local_base_freq=1000.0,
        query_pre_attn_scalar=48, final_logit_softcapping=8.0, tie_word_embeddings=True,
    ), torch.float32, 6000),
}


@torch.inference_mode()
def logprobs_of(model, ids):
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)  # [T, V]


def variant(model, edit):
    """The same weights under a config that `edit` changed (in place)."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    edit(config)
    other = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    other.load_state_dict(model.state_dict())
    return other


def difference(model, ids, edit):
    """max |Δ logprob| at each position [T] between the model and its edited variant."""
    return (logprobs_of(model, ids) - logprobs_of(variant(model, edit), ids)).abs().amax(dim=-1)


def setter(**values):
    def edit(config):
        for key, value in values.items():
            setattr(config, key, value)
    return edit


def check(name, model, cases, folder):
    saved = json.loads((folder / "config.json").read_text())
    config = model.config
    assert saved["model_type"] == {"gemma2-tiny": "gemma2", "gemma3-tiny": "gemma3_text"}[name], saved["model_type"]
    assert config.head_dim != config.hidden_size // config.num_attention_heads
    assert config.query_pre_attn_scalar != config.head_dim
    assert set(saved["layer_types"]) == {"sliding_attention", "full_attention"}, saved["layer_types"]
    ids = max((case["input_ids"] for case in cases), key=len)
    window = config.sliding_window
    assert window < len(ids)

    # The window is applied: without it (a window longer than any prompt), positions before it agree.
    diff = difference(model, ids, setter(sliding_window=4096))
    print(f"    sliding window: max |diff| before position {window}: {float(diff[:window].max()):.2g}, "
          f"after: {float(diff[window:].max()):.2g}")
    assert float(diff[:window].max()) < 1e-5 and float(diff[window:].min()) > 1e-3

    # The soft caps are reached: the raw logits exceed the cap, and removing a cap changes the output.
    cap = config.final_logit_softcapping
    uncapped = variant(model, setter(final_logit_softcapping=None))
    with torch.inference_mode():
        raw = float(uncapped(torch.tensor([ids])).logits.abs().max())
    diff = difference(model, ids, setter(final_logit_softcapping=None))
    print(f"    final logit soft cap {cap}: max |raw logit| {raw:.3g}, max |diff| without it {float(diff.max()):.3g}")
    assert raw > cap and float(diff.min()) > 1e-3
    if name == "gemma2-tiny":
        diff = difference(model, ids, setter(attn_logit_softcapping=None))
        print(f"    attention soft cap {config.attn_logit_softcapping}: max |diff| without it {float(diff.max()):.3g}")
        assert float(diff.max()) > 0.1, "attention soft cap not reached"
        assert saved["attn_logit_softcapping"] == 10.0 and saved["tie_word_embeddings"] is False, saved

    if name == "gemma3-tiny":
        rope = saved["rope_parameters"]
        assert rope["full_attention"]["rope_type"] == "linear" and rope["full_attention"]["factor"] == 8.0, rope
        assert rope["sliding_attention"]["rope_theta"] != rope["full_attention"]["rope_theta"], rope
        assert saved["attn_logit_softcapping"] is None and saved["tie_word_embeddings"] is True, saved

        def unscaled(config):  # global layers without linear scaling
            config.rope_parameters["full_attention"] = {"rope_type": "default", "rope_theta": 100000.0}

        def same_theta(config):  # local layers with the global layers' theta
            config.rope_parameters["sliding_attention"] = {"rope_type": "default", "rope_theta": 100000.0}

        for what, edit in (("linear rope scaling", unscaled), ("local rope theta", same_theta)):
            diff = difference(model, ids, edit)
            print(f"    {what}: max |diff| without it {float(diff.max()):.3g}")
            assert float(diff[1:].min()) > 1e-4, what  # position 0 is not rotated at all
