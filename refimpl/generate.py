"""Greedy generation: the simplest loop from a prompt to new tokens.

Prefill runs the whole prompt through the model once, filling the KV cache; every decode step
then feeds back only the token just chosen. Greedy means argmax, ties going to the lowest id
(NumPy's argmax returns the first maximum), as transformers does.
"""

from refimpl.model import forward
from refimpl.xp import to_numpy


def greedy(model, prompt_ids, max_new_tokens, stop_ids=()):
    """Yield up to max_new_tokens greedy token ids after prompt_ids, stopping after a stop id."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: at least one token is needed to predict the next")
    cache = model.new_cache(len(prompt_ids) + max_new_tokens)
    logits = forward(model, [prompt_ids], [cache])  # [1, V]
    for _ in range(max_new_tokens):
        token = int(to_numpy(logits[0]).argmax())
        yield token
        if token in stop_ids:
            return
        logits = forward(model, [[token]], [cache])
