"""GPT-2's tiny random model for `make golden` (see README.md here): refimpl/models/gpt2.py.

gpt2-tiny: width 64, 4 heads of 16, 2 blocks, MLP width 4 x 64 (n_inner null), 512 learned
positions, a 320-token vocabulary (room for the byte-level tokenizer that the serving tests give
it: 3 specials with end-of-text at id 2, 256 bytes, merges), tied head, GELU "gelu_new".
make_golden_logprobs.py's
redraw_parameters gives the LayerNorm gains (ln_*.weight) values around 1, like other norms,
and its biases (ln_*.bias, c_attn/c_proj/c_fc biases) nonzero values, so every term is tested.
"""

import json

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GPT2Config

MODELS = {
    "gpt2-tiny": (GPT2Config(
        n_embd=64, n_layer=2, n_head=4, n_positions=512, vocab_size=320, n_inner=None,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True,
        bos_token_id=2, eos_token_id=2,  # GPT-2's 50256 is outside this vocabulary; 2 is the tests' <|im_end|>
    ), torch.float32, 5000),
}


@torch.inference_mode()
def logprobs_with(model, ids, change):
    """Log-probabilities of ids under a copy of model whose config or weights `change` altered."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    copy = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    copy.load_state_dict(model.state_dict())
    change(copy)
    return torch.log_softmax(copy(torch.tensor([ids])).logits[0].float(), dim=-1)


def check(name, model, cases, folder):
    """The saved model is the GPT-2 we meant, and its golden data tells apart what refimpl must get right."""
    saved = json.loads((folder / "config.json").read_text())
    wanted = {"model_type": "gpt2", "activation_function": "gelu_new", "tie_word_embeddings": True,
              "n_positions": 512, "n_inner": None, "scale_attn_weights": True,
              "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
              "add_cross_attention": False}
    for key, value in wanted.items():
        assert saved.get(key) == value, f"{folder}/config.json: {key} = {saved.get(key)!r}, wanted {value!r}"

    # The head is tied and not saved; no attention-mask buffers (attn.bias, attn.masked_bias) either.
    with safe_open(folder / "model.safetensors", "np") as f:
        keys = set(f.keys())
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "lm_head is not tied to wte"
    assert not any(k.startswith("lm_head") or k.endswith((".attn.bias", ".attn.masked_bias")) for k in keys), sorted(keys)
    assert len(keys) == 4 + 12 * model.config.n_layer, sorted(keys)

    # Each change must move some log-probability by well over the golden tests' 1e-4 tolerance,
    # so a refimpl that made it would fail them.
    ids = max((case["input_ids"] for case in cases), key=len)
    reference = logprobs_with(model, ids, lambda m: None)
    changes = {
        # Exact (erf) GELU instead of the tanh approximation: the golden data must tell them apart.
        "exact gelu": lambda m: [setattr(block.mlp, "act", torch.nn.GELU()) for block in m.transformer.h],
        # No position embedding: positions must matter.
        "no wpe": lambda m: torch.nn.init.zeros_(m.transformer.wpe.weight),
        # LayerNorm without its biases: they must matter too.
        "no ln biases": lambda m: [torch.nn.init.zeros_(p) for n, p in m.named_parameters()
                                   if n.split(".")[-2].startswith("ln_") and n.endswith(".bias")],
    }
    for what, change in changes.items():
        diff = float((logprobs_with(model, ids, change) - reference).abs().max())
        print(f"    {what}: max |diff| {diff:.3g} nats")
        assert diff > 5e-4, f"{name}: {what} changes the log-probabilities by only {diff:.3g}"
