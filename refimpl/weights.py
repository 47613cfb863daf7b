"""Load a checkpoint's tensors from safetensors files, strictly.

Every tensor the config implies must be present with its exact shape, and nothing else may be
there: a missing, extra or mis-shaped tensor is an error that names it. Files are read with the
`safetensors` library only (never pickle: `pytorch_model.bin` is not read). Stored dtypes F32,
F16 and BF16 are converted to float32, the one dtype refimpl computes in. NumPy has no bfloat16,
so BF16 is widened by hand: a bfloat16 is the top 16 bits of a float32.

Weights keep their Hugging Face names; per-layer tensors drop the `model.layers.{i}.` prefix,
q/k/v and gate/up are stacked into one matrix each, and projections are stored [in, out]
(see arrange_layer). The output head is stored [in, out] as well, [D, V]; when the embeddings
are tied it is the only copy of that matrix, and the embedding lookup reads its columns.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors


class WeightsError(ValueError):
    """The checkpoint does not match the config, or a file is unreadable."""


@dataclass
class Weights:
    embed_tokens: object  # [V, D]; None when tied: then token t's embedding is lm_head[:, t]
    layers: list  # one dict per block: "self_attn.qkv_proj.weight" -> array, ...
    norm: object  # [D]
    lm_head: object  # [D, V], transposed like every projection (see load_weights)


def expected_shapes(cfg):
    """Every tensor name the config implies, with its shape."""
    D, F, V, Dh = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    layer = {
        "input_layernorm.weight": (D,),
        "self_attn.q_proj.weight": (H * Dh, D),
        "self_attn.k_proj.weight": (Hkv * Dh, D),
        "self_attn.v_proj.weight": (Hkv * Dh, D),
        "self_attn.o_proj.weight": (D, H * Dh),
        "post_attention_layernorm.weight": (D,),
        "mlp.gate_proj.weight": (F, D),
        "mlp.up_proj.weight": (F, D),
        "mlp.down_proj.weight": (D, F),
    }
    if cfg.qkv_bias:
        layer |= {"self_attn.q_proj.bias": (H * Dh,), "self_attn.k_proj.bias": (Hkv * Dh,),
                  "self_attn.v_proj.bias": (Hkv * Dh,)}
    if cfg.o_bias:
        layer["self_attn.o_proj.bias"] = (D,)
    if cfg.mlp_bias:
        layer |= {"mlp.gate_proj.bias": (F,), "mlp.up_proj.bias": (F,), "mlp.down_proj.bias": (D,)}
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(cfg.num_hidden_layers):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in layer.items()}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def safetensors_files(path):
    """The checkpoint's files: model.safetensors, or the shards its index lists."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / shard for shard in shards]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    raise WeightsError(f"{path}: no model.safetensors or model.safetensors.index.json "
                       "(pickled checkpoints such as pytorch_model.bin are never read)")


def read_tensors(file):
    """All tensors of one safetensors file as float32 NumPy arrays."""
    try:
        entries = safetensors.deserialize(Path(file).read_bytes())
    except (safetensors.SafetensorError, OSError) as e:
        raise WeightsError(f"{file}: cannot read as safetensors: {e}") from None
    return {name: to_float32(name, t["dtype"], t["shape"], t["data"]) for name, t in entries}


def to_float32(name, dtype, shape, data):
    if dtype == "F32":
        x = np.frombuffer(data, dtype="<f4")
    elif dtype == "F16":
        x = np.frombuffer(data, dtype="<f2").astype(np.float32)
    elif dtype == "BF16":
        x = (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        raise WeightsError(f"tensor {name}: dtype {dtype} is not supported (F32, F16, BF16)")
    return x.reshape(shape)


def arrange_layer(layer):
    """Lay one block's matrices out the way BLAS reads them fastest; the numbers stay the checkpoint's.

    - Projections that read the same input are stacked into one matrix each: q, k and v all
      read the normalised block input, and so do gate and up in the MLP; one [576, 960] product
      runs about 25% faster than three smaller ones, and a step makes fewer calls (vLLM does the
      same): self_attn.qkv_proj = [q_proj; k_proj; v_proj], mlp.gate_up_proj = [gate_proj; up_proj].
    - Every projection matrix is stored transposed, [in, out] instead of the checkpoint's
      [out, in], so that `x @ W` is a plain row-major product: with x of 1 to 16 rows (decoding)
      OpenBLAS runs it about 25% faster than `x @ W.T` on this layout's transpose.
    """
    fused = dict(layer)
    for new, parts in (("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                       ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"))):
        for kind in ("weight", "bias"):
            names = [f"{part}.{kind}" for part in parts]
            if names[0] in fused:
                fused[f"{new}.{kind}"] = np.concatenate([fused.pop(n) for n in names], axis=0)
    return {name: np.ascontiguousarray(t.T) if t.ndim == 2 else t for name, t in fused.items()}


def load_weights(path, cfg, xp):
    """Read, check and move to the device every tensor of the checkpoint in `path`."""
    tensors = {}
    for file in safetensors_files(path):
        shard = read_tensors(file)
        if twice := sorted(set(shard) & set(tensors)):
            raise WeightsError(f"tensor {twice[0]} appears in more than one file (again in {file.name})")
        tensors |= shard
    expected = expected_shapes(cfg)
    for name, shape in expected.items():
        if name not in tensors:
            raise WeightsError(f"tensor {name} is missing (expected shape {list(shape)})")
        if tuple(tensors[name].shape) != shape:
            raise WeightsError(f"tensor {name} has shape {list(tensors[name].shape)}, expected {list(shape)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise WeightsError(f"unexpected tensor {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                           + " not used by this config")

    def take(name):
        return xp.asarray(tensors.pop(name))

    layers = []
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        layer = {n[len(prefix):]: tensors.pop(n) for n in list(tensors) if n.startswith(prefix)}
        layers.append({name: xp.asarray(t) for name, t in arrange_layer(layer).items()})
    # The head multiplies every decoded row by a [V, D] matrix, the largest product of a step
    # (113 MB for a 49152-token vocabulary): stored [D, V], `x @ W` runs 20-30% faster for
    # 1 to 16 rows than `x @ W.T` does on the checkpoint's layout. A tied model keeps only this
    # copy; looking up a few embedding columns in it costs microseconds.
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    lm_head = xp.asarray(np.ascontiguousarray(tensors.pop(head).T))
    embed = None if cfg.tie_word_embeddings else take("model.embed_tokens.weight")
    return Weights(embed_tokens=embed, layers=layers, norm=take("model.norm.weight"), lm_head=lm_head)
