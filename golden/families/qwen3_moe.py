"""Qwen3-MoE's tiny random model for `make golden` (see README.md here): Qwen3 attention with a
sparse mixture of 8 experts, 2 per token, in blocks 0 and 2, and a dense MLP in block 1
(mlp_only_layers), so that both kinds of block are tested."""

import json

import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeMLP, Qwen3MoeSparseMoeBlock

ROUTING_MARGIN = 1e-5  # smallest gap between a token's k-th and (k+1)-th router probability

# name -> (config, dtype of the weights on disk, first seed to try)
MODELS = {
    "qwen3-moe-tiny": (Qwen3MoeConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_hidden_layers=3,
        intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1],
        vocab_size=320, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False,
    ), torch.float32, 7000),
}


@torch.inference_mode()
def check(name, model, cases, folder):
    """The config says what we meant; blocks 0 and 2 are mixtures of experts and block 1 dense;
    the experts are routed differently per token (different top-2 sets within one prompt, every
    expert used); and no token is near a tie between its 2nd and 3rd expert, where float32
    rounding could flip the choice."""
    saved = json.loads((folder / "config.json").read_text())
    wanted = {"model_type": "qwen3_moe", "head_dim": 32, "num_local_experts": 8, "num_experts_per_tok": 2,
              "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [1], "use_sliding_window": False}
    for key, value in wanted.items():
        assert saved.get(key) == value, f"{folder}/config.json: {key} = {saved.get(key)!r}, wanted {value!r}"
    kinds = [type(layer.mlp) for layer in model.model.layers]
    assert kinds == [Qwen3MoeSparseMoeBlock, Qwen3MoeMLP, Qwen3MoeSparseMoeBlock], kinds

    k, E = model.config.num_experts_per_tok, model.config.num_experts
    used, margin = set(), float("inf")
    for case in cases:
        ids = case["input_ids"] + case["greedy_ids"]
        router_logits = model(torch.tensor([ids]), output_router_logits=True).router_logits  # one [T, E] per MoE block
        assert len(router_logits) == 2, len(router_logits)
        for logits in router_logits:
            probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
            top = torch.topk(probs, k + 1, dim=-1)
            chosen = [frozenset(row) for row in top.indices[:, :k].tolist()]
            used |= set().union(*chosen)
            margin = min(margin, float((top.values[:, k - 1] - top.values[:, k]).min()))
            if len(case["input_ids"]) > 1:
                assert len(set(chosen)) > 1, f"{case['name']}: every token went to the same experts"
        print(f"    {case['name']}: {len(set(chosen))} different expert pairs over {len(ids)} tokens (last block)")
    print(f"    experts used: {sorted(used)}; smallest gap between 2nd and 3rd router probability {margin:.2g}")
    assert used == set(range(E)), f"experts {set(range(E)) - used} are never chosen"
    assert margin > ROUTING_MARGIN, "a token is near a routing tie: choose another seed"
