"""Reading config.json, and what several families read the same way.

Each family reads the fields it needs into its own Config (refimpl/models/); the registry picks
the family by `model_type`. Anything a config asks for that refimpl does not do is refused by
name (ConfigError), never approximated.
"""

import json
from pathlib import Path


class ConfigError(ValueError):
    """config.json asks for something this implementation does not do."""


def read_config(path):
    """config.json of a model directory, as a dict."""
    return json.loads((Path(path) / "config.json").read_text())


def rope_parameters(c):
    """rope_theta and rope_scaling, from either the classic keys or transformers 5's `rope_parameters`."""
    params = dict(c.get("rope_parameters") or {})
    if "rope_theta" in c:
        params.setdefault("rope_theta", c["rope_theta"])
    if c.get("rope_scaling"):
        params.update(c["rope_scaling"])
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", 10000.0))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return theta, {"rope_type": "llama3", **{k: params[k] for k in keys}}
    raise ConfigError(f"rope scaling {rope_type!r} is not supported (supported: default, llama3)")
