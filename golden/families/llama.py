"""The Llama family's tiny models beyond make_golden_logprobs.py's four: layers of mixed kinds.

qwen2-mixed-window: Qwen2 with use_sliding_window and max_window_layers 1, so layer 0 attends to
every earlier key and layers 1-2 to the last 16 only (transformers derives layer_types so):
refimpl must give each layer its own window (models/llama.py, layer_windows).
"""

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

WINDOW = 16

MODELS = {
    "qwen2-mixed-window": (Qwen2Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=384, num_hidden_layers=3,
        intermediate_size=192, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False,
        use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
    ), torch.float32, 7000),
}


@torch.inference_mode()
def logprobs(model, ids):
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def check(name, model, cases, folder):
    """The layer kinds are mixed, and each kind matters: making every layer full, or every layer
    sliding, changes the output after the window (and only there)."""
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"], model.config.layer_types
    ids = max((case["input_ids"] for case in cases), key=len)
    ours = logprobs(model, ids)
    for kinds in (["full_attention"] * 3, ["sliding_attention"] * 3):
        config = model.config.__class__.from_dict({**model.config.to_dict(), "layer_types": kinds})
        other = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        other.load_state_dict(model.state_dict())
        diff = (logprobs(other, ids) - ours).abs().amax(dim=-1)  # [T]
        print(f"    all {kinds[0]}: max |diff| before position {WINDOW}: {float(diff[:WINDOW].max()):.2g}, "
              f"after: {float(diff[WINDOW:].max()):.2g}")
        assert float(diff[:WINDOW].max()) < 1e-5 and float(diff[WINDOW:].max()) > 1e-3
