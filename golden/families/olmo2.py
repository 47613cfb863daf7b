"""OLMo 2's tiny random model for `make golden` (see README.md here): post-norm blocks and
QK-norm over the whole q / k projection, with attention biases and an untied head."""

import json

import torch
from transformers import Olmo2Config

# name -> (config, dtype of the weights on disk, first seed to try)
MODELS = {
    # Real OLMo 2 checkpoints have no attention biases; this one has them (on q, k, v and o), so
    # the bias path is tested too. Head width 64 / 4 = 16.
    "olmo2-tiny": (Olmo2Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=128, vocab_size=384, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_theta=500000.0, attention_bias=True, tie_word_embeddings=False,
        pad_token_id=1, eos_token_id=2,
    ), torch.float32, 5000),
}


@torch.inference_mode()
def check(name, model, cases, folder):
    """The config and tensors say what we meant, and normalising q over the whole row differs
    from normalising each head: the heads of one token have clearly different RMS."""
    saved = json.loads((folder / "config.json").read_text())
    for key, value in {"model_type": "olmo2", "attention_bias": True, "tie_word_embeddings": False}.items():
        assert saved.get(key) == value, f"{folder}/config.json: {key} = {saved.get(key)!r}, wanted {value!r}"
    state = model.state_dict()
    c = model.config
    H, Hkv, Dh = c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    assert state["model.layers.0.self_attn.q_norm.weight"].shape == (H * Dh,)
    assert state["model.layers.0.self_attn.k_norm.weight"].shape == (Hkv * Dh,)
    assert "model.layers.0.post_feedforward_layernorm.weight" in state
    assert not any("input_layernorm" in n for n in state), "OLMo 2 blocks normalise outputs, not inputs"

    captured = []
    hook = model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: captured.append(o))
    ids = max((case["input_ids"] for case in cases), key=len)
    model(torch.tensor([ids]))
    hook.remove()
    q = captured[0][0].reshape(len(ids), H, Dh)  # [T, H, Dh]
    rms = q.pow(2).mean(-1).sqrt()  # [T, H]
    spread = float((rms.amax(-1) / rms.amin(-1)).median())
    print(f"    q heads' RMS spread (max / min per token, median over tokens): {spread:.2f}")
    assert spread > 1.2, "per-head and whole-row QK-norm would agree: the test would not tell them apart"
