"""How checkpoint tensors are laid out for the forward pass: the rules every family shares.

The numbers stay the checkpoint's; only their arrangement changes, for speed:
- Projections that read the same input are stacked into one matrix each: q, k and v all read
  the normalised block input, and so do gate and up in a gated MLP; one [576, 960] product runs
  about 25% faster than three smaller ones, and a step makes fewer calls (vLLM does the same):
  self_attn.qkv_proj = [q_proj; k_proj; v_proj], mlp.gate_up_proj = [gate_proj; up_proj].
- Every projection matrix is stored transposed, [in, out] instead of the checkpoint's [out, in],
  so that `x @ W` is a plain row-major product: with x of 1 to 16 rows (decoding) OpenBLAS runs
  it about 25% faster than `x @ W.T` on this layout's transpose.
- The output head is stored [D, V] for the same reason; a tied model keeps only that copy, and
  embedding a token reads a column of it.

A family file says which of these its checkpoint needs (its load_weights); the tensor names
are the family's.
"""

import numpy as np

QKV = ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
GATE_UP = ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"))


def take_layer(tensors, i, prefix="model.layers.{}."):
    """Block i's tensors, removed from `tensors`, named without the block's prefix."""
    prefix = prefix.format(i)
    return {n[len(prefix):]: tensors.pop(n) for n in list(tensors) if n.startswith(prefix)}


def stacked(layer, groups=(QKV, GATE_UP)):
    """The layer with each group (new name, parts) that it holds stacked into one tensor, weights
    and biases alike, parts in order along the output dimension."""
    fused = dict(layer)
    for new, parts in groups:
        for kind in ("weight", "bias"):
            names = [f"{part}.{kind}" for part in parts]
            if names[0] in fused:
                fused[f"{new}.{kind}"] = np.concatenate([fused.pop(n) for n in names], axis=0)
    return fused


def stacked_experts(layer, E, experts, gate, up, down, into):
    """A mixture-of-experts block's E experts as two 3-D arrays, expert e at index e, each already
    [in, out]: `into`.gate_up_proj [E, D, 2F] (gate and up side by side, as transformers 5 holds
    them in memory) and `into`.down_proj [E, F, D]. `experts` is the experts' name prefix
    ("mlp.experts."), gate/up/down their projections' names ("gate_proj.weight", ...)."""
    fused = dict(layer)
    names = [f"{experts}{e}." for e in range(E)]
    fused[f"{into}.gate_up_proj"] = np.stack(
        [np.concatenate([fused.pop(x + gate), fused.pop(x + up)], axis=0).T for x in names])  # [E, D, 2F]
    fused[f"{into}.down_proj"] = np.stack([fused.pop(x + down).T for x in names])  # [E, F, D]
    return fused


def transposed(layer):
    """Every matrix [out, in] -> [in, out], contiguous; other tensors as they are (contiguous)."""
    return {name: np.ascontiguousarray(t.T if t.ndim == 2 else t) for name, t in layer.items()}


def on_device(xp, layer):
    return {name: xp.asarray(t) for name, t in layer.items()}


def embedding_and_head(xp, tensors, tied, embedding="model.embed_tokens.weight", head="lm_head.weight"):
    """(token embedding [V, D] or None when tied, output head [D, V]), removed from `tensors`.

    The head multiplies every decoded row by a [V, D] matrix, the largest product of a step
    (113 MB for a 49152-token vocabulary): stored [D, V], `x @ W` runs 20-30% faster for 1 to 16
    rows than `x @ W.T` does on the checkpoint's layout."""
    lm_head = xp.asarray(np.ascontiguousarray(tensors.pop(embedding if tied else head).T))
    return (None if tied else xp.asarray(tensors.pop(embedding))), lm_head


def embed(xp, embed_tokens, lm_head, ids):
    """The embedding rows of token ids [N] -> [N, D]; a tied model (embed_tokens None) reads them as
    columns of the head [D, V]."""
    if embed_tokens is None:
        rows = xp.matrix_transpose(xp.take(lm_head, ids, axis=1))  # [N, D], a transposed view of [D, N]
        # Copied row after row (flattening a transposed view copies it): NumPy would sum a view's rows
        # in an order that depends on N (see batching.py).
        return xp.reshape(xp.reshape(rows, (-1,)), rows.shape)
    return xp.take(embed_tokens, ids, axis=0)
