"""Phi-3's tiny random models for `make golden` (see README.md here): fused qkv_proj and
gate_up_proj, a sliding window, and LongRoPE with partial rotary embeddings (as Phi-4-mini has).

LongRoPE chooses its frequencies by sequence length: transformers uses the long factors in a
forward call whose positions reach beyond original_max_position_embeddings (40 here), the short
ones otherwise. The prompts are 48, 56, 64 and 1 tokens long, each followed by 32 greedy steps:
the first three are long from their first call on, the one-token prompt stays short through its
33 positions, so no case switches factors halfway (a switch would leave keys rotated both ways in
transformers' cache, and its cached greedy steps would no longer match a full pass).
"""

import json

import torch
from transformers import AutoModelForCausalLM, Phi3Config

SMALL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
LONGROPE = {
    "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
    # head width 16, three quarters rotated: 12 dimensions, 6 frequencies, one factor each.
    "short_factor": [1.0, 1.1, 1.25, 1.5, 2.0, 2.5],
    "long_factor": [1.0, 1.5, 3.0, 6.0, 10.0, 16.0],
}
ORIGINAL_MAX = 40  # max_position_embeddings 512 / 40: factor 12.8, attention scaling ~1.30

# name -> (config, dtype of the weights on disk, first seed to try)
MODELS = {
    # Phi-3-mini's shape in miniature: untied head, plain RoPE, and a sliding window (the real
    # config.json says 2047) shorter than the prompts.
    "phi3-tiny": (Phi3Config(
        **SMALL, vocab_size=384, intermediate_size=128, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, sliding_window=24,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ), torch.float32, 7000),
    # Phi-4-mini's shape in miniature: tied head, LongRoPE over the first 3/4 of each head.
    "phi3-longrope-tiny": (Phi3Config(
        **SMALL, vocab_size=320, intermediate_size=160, max_position_embeddings=512,
        original_max_position_embeddings=ORIGINAL_MAX, rope_parameters=dict(LONGROPE),
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ), torch.float32, 7100),
}


@torch.inference_mode()
def logprobs(model, ids):
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)  # [T, V]


def variant(model, **changes):
    """The same weights under a changed config."""
    config = Phi3Config.from_dict({**model.config.to_dict(), **changes})
    other = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    other.load_state_dict(model.state_dict())
    return other


def check(name, model, cases, folder):
    saved = json.loads((folder / "config.json").read_text())
    state = model.state_dict()
    assert saved["model_type"] == "phi3" and saved["hidden_act"] == "silu"
    assert state["model.layers.0.self_attn.qkv_proj.weight"].shape == ((4 + 2 * 2) * 16, 64)
    assert state["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * model.config.intermediate_size, 64)
    if name == "phi3-tiny":
        check_sliding_window(model, cases, saved)
    else:
        check_longrope(model, cases, saved)


def check_sliding_window(model, cases, saved):
    """The window is shorter than the prompts and eager attention applies it."""
    window = saved["sliding_window"]
    assert window == 24 and saved["rope_parameters"]["rope_type"] == "default", saved
    ids = max((case["input_ids"] for case in cases), key=len)
    diff = (logprobs(model, ids) - logprobs(variant(model, sliding_window=None), ids)).abs().amax(dim=-1)
    print(f"    sliding window: max |diff| before position {window}: {float(diff[:window].max()):.2g}, "
          f"after: {float(diff[window:].min()):.2g} (min)")
    assert float(diff[:window].max()) < 1e-5 and float(diff[window:].min()) > 1e-3


def check_longrope(model, cases, saved):
    """Both factor sets are used, each changes the output, and the prompts never switch halfway."""
    rope = saved["rope_parameters"]
    assert rope["rope_type"] == "longrope" and rope["partial_rotary_factor"] == 0.75, rope
    assert saved["original_max_position_embeddings"] == ORIGINAL_MAX, saved
    assert model.model.rotary_emb.original_inv_freq.shape == (6,)  # 12 of 16 dimensions rotated
    assert model.model.rotary_emb.attention_scaling > 1.2

    long_cases = [c for c in cases if len(c["input_ids"]) > ORIGINAL_MAX]
    short_cases = [c for c in cases if len(c["input_ids"]) + len(c["greedy_ids"]) <= ORIGINAL_MAX]
    assert len(long_cases) + len(short_cases) == len(cases), "a case switches factors halfway"
    assert long_cases and short_cases, "both the short and the long factors must be exercised"

    plain = variant(model, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                            "partial_rotary_factor": 0.75})
    short_ids = short_cases[0]["input_ids"] + short_cases[0]["greedy_ids"][:-1]  # one short pass, 32 tokens
    long_ids = long_cases[0]["input_ids"]
    scaled_short = float((logprobs(model, short_ids) - logprobs(plain, short_ids)).abs().max())
    scaled_long = float((logprobs(model, long_ids) - logprobs(plain, long_ids)).abs().max())
    # The first 32 positions of a long pass (long factors) against a 32-token pass (short factors).
    n = len(short_ids)
    long_vs_short = float((logprobs(model, long_ids)[:n] - logprobs(model, long_ids[:n])).abs().max())
    print(f"    longrope: max |diff| from plain RoPE, short pass {scaled_short:.2g}, long pass {scaled_long:.2g}; "
          f"long vs short factors on the same {n} tokens {long_vs_short:.2g}")
    assert scaled_short > 1e-2 and scaled_long > 1e-2 and long_vs_short > 1e-2
