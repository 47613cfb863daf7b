"""Mixtral's tiny random model for `make golden` (see README.md here): a top-2 mixture of four
SwiGLU experts behind Mistral's attention, with a sliding window shorter than the prompts."""

import json

import torch
from transformers import AutoModelForCausalLM, MixtralConfig

# name -> (config, dtype of the weights on disk, first seed to try)
MODELS = {
    # Head width 64 / 4 = 16. HF's window: the query at position i sees keys i-31 .. i.
    "mixtral-tiny": (MixtralConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, vocab_size=448,
        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=32,
        tie_word_embeddings=False,
    ), torch.float32, 6000),
}


@torch.inference_mode()
def routes(model, ids):
    """The pair of experts each token of ids is sent to, per layer: [L][T] sorted tuples."""
    captured = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: captured.append(o[2]))  # top-k indices
             for layer in model.model.layers]
    model(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    return [[tuple(sorted(row)) for row in indices.tolist()] for indices in captured]


@torch.inference_mode()
def check(name, model, cases, folder):
    """The config says what we meant; different tokens of one prompt go to different expert pairs,
    in every layer; and the window changes the logits of every position past it, only those."""
    saved = json.loads((folder / "config.json").read_text())
    wanted = {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 32}
    for key, value in wanted.items():
        assert saved.get(key) == value, f"{folder}/config.json: {key} = {saved.get(key)!r}, wanted {value!r}"

    ids = max((case["input_ids"] for case in cases), key=len)
    for layer, pairs in enumerate(routes(model, ids)):
        counts = {pair: pairs.count(pair) for pair in set(pairs)}
        print(f"    layer {layer}: {len(ids)} tokens routed to {len(counts)} expert pairs {sorted(counts.items())}")
        assert len(counts) >= 4, f"layer {layer}: the tokens are routed to only {len(counts)} expert pairs"
        assert max(counts.values()) < 0.6 * len(ids), f"layer {layer}: one expert pair takes most tokens"

    config = model.config.__class__.from_dict(model.config.to_dict())
    config.sliding_window = None
    unwindowed = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    unwindowed.load_state_dict(model.state_dict())
    window = model.config.sliding_window
    logits = [torch.log_softmax(m(torch.tensor([ids])).logits[0], dim=-1) for m in (model, unwindowed)]
    diff = (logits[0] - logits[1]).abs().amax(dim=-1)  # [T]
    print(f"    sliding window: max |diff| before position {window}: {float(diff[:window].max()):.2g}, "
          f"after: min {float(diff[window:].min()):.2g}")
    assert float(diff[:window].max()) < 1e-5 and float(diff[window:].min()) > 1e-3
