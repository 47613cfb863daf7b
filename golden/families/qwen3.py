"""Qwen3's tiny random model for `make golden` (see README.md here): the Llama network with
QK-norm (an RMSNorm over each head of q and k, before RoPE), no attention biases, and a head
width (32) that is not hidden / heads (16)."""

import json

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

# name -> (config, dtype of the weights on disk, first seed to try)
MODELS = {
    # Tied like the small Qwen3 checkpoints (0.6B to 4B); q_proj is [4 * 32, 64].
    "qwen3-tiny": (Qwen3Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_hidden_layers=2,
        intermediate_size=128, vocab_size=384, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_theta=10000.0, attention_bias=False, use_sliding_window=False, tie_word_embeddings=True,
    ), torch.float32, 6000),
}


def logprobs(model, ids):
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)  # [T, V]


@torch.inference_mode()
def check(name, model, cases, folder):
    """The config and tensors say what we meant, and QK-norm changes the output: the same model
    with q_norm and k_norm taken out gives clearly different log-probabilities."""
    saved = json.loads((folder / "config.json").read_text())
    wanted = {"model_type": "qwen3", "head_dim": 32, "attention_bias": False, "tie_word_embeddings": True,
              "use_sliding_window": False, "layer_types": ["full_attention"] * 2}
    for key, value in wanted.items():
        assert saved.get(key) == value, f"{folder}/config.json: {key} = {saved.get(key)!r}, wanted {value!r}"
    state = model.state_dict()
    assert state["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)
    assert state["model.layers.0.self_attn.q_norm.weight"].shape == (32,)
    assert not any(n.endswith(".bias") for n in state), "Qwen3 has no biases"

    ids = max((case["input_ids"] for case in cases), key=len)
    plain = AutoModelForCausalLM.from_config(model.config, attn_implementation="eager").eval()
    plain.load_state_dict(model.state_dict())
    for layer in plain.model.layers:
        layer.self_attn.q_norm = torch.nn.Identity()
        layer.self_attn.k_norm = torch.nn.Identity()
    diff = float((logprobs(model, ids) - logprobs(plain, ids)).abs().max())
    print(f"    without QK-norm the log-probabilities move by up to {diff:.3g}")
    assert diff > 0.1, "QK-norm barely matters in this model: the test would not catch its absence"
