"""Load a checkpoint's tensors from safetensors files, strictly.

Every tensor the config implies must be present with its exact shape, and nothing else may be
there: a missing, extra or mis-shaped tensor is an error that names it. Files are read with the
`safetensors` library only (never pickle: `pytorch_model.bin` is not read). Stored dtypes F32,
F16 and BF16 are converted to float32, the one dtype refimpl computes in. NumPy has no bfloat16,
so BF16 is widened by hand: a bfloat16 is the top 16 bits of a float32.

This module knows files, dtypes and strictness, nothing about architectures: the tensors a
config implies, and how they are laid out for the forward pass, are the family's business
(refimpl/models/). Tensors keep their Hugging Face names.
"""

import json
from pathlib import Path

import numpy as np
import safetensors


class WeightsError(ValueError):
    """The checkpoint does not match the config, or a file is unreadable."""


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


def read_checkpoint(path, expected):
    """Every tensor of the checkpoint in `path` as float32 NumPy arrays, checked against `expected`
    (name -> shape, from the model's family): all present with their shapes, nothing else."""
    tensors = {}
    for file in safetensors_files(path):
        shard = read_tensors(file)
        if twice := sorted(set(shard) & set(tensors)):
            raise WeightsError(f"tensor {twice[0]} appears in more than one file (again in {file.name})")
        tensors |= shard
    for name, shape in expected.items():
        if name not in tensors:
            raise WeightsError(f"tensor {name} is missing (expected shape {list(shape)})")
        if tuple(tensors[name].shape) != shape:
            raise WeightsError(f"tensor {name} has shape {list(tensors[name].shape)}, expected {list(shape)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise WeightsError(f"unexpected tensor {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                           + " not used by this config")
    return tensors
