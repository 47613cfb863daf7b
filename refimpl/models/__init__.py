"""The model families, keyed by config.json's `model_type`, and the calls the rest of refimpl makes.

Each family is one module of this package (listed in FAMILIES by the model_types it serves, which
it also names in its MODEL_TYPES) that owns everything particular to it: the config
fields it reads (its Config class, with from_dict), the tensors its checkpoint holds (expected_shapes), how it
lays them out (load_weights), its forward pass, and its output_logits (the final norm and head alone,
which the logit lens applies to every layer). The engine and generation call only `load_model` and
`forward(model, tokens, caches, all_logits)`, whatever the family; inspection.py also `output_logits`.
"""

import importlib
from dataclasses import dataclass

from refimpl.config import ConfigError, read_config
from refimpl.kv_cache import KVCache
from refimpl.weights import read_checkpoint
from refimpl.xp import keep_freed_memory, namespace

# model_type -> the module of this package that implements it. A module is imported when a model
# of its family is loaded, so a family's file is read only by those who use it.
FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "phi3": "phi3",
    "qwen3": "llama",
    "qwen3_moe": "qwen3_moe",
    "gemma2": "gemma",
    "gemma3_text": "gemma",
    "olmo2": "olmo2",
    "mixtral": "mixtral",
    "gpt2": "gpt2",
}


@dataclass
class Model:
    config: object  # the family's config class
    weights: object  # the family's weights, on the device
    xp: object  # the array namespace
    family: object  # the family's module

    def new_cache(self, capacity, prompt_length=None):
        """A KV cache for `capacity` positions, of which the first `prompt_length` are the prompt: the
        rows after it are decoded one token at a time, and multiplied so (batching.py). Without it
        every row is taken for a prompt's: right, but a decoding step then costs a 32-row product."""
        cache = KVCache(self.xp, self.config, capacity, prompt_length)
        if hasattr(self.family, "cache_kind"):  # the few families whose keys depend on more than position
            cache.kind = self.family.cache_kind(self.config, capacity)
        return cache


def family_of(config):
    """The module of config.json's model_type (a dict), or ConfigError naming what is supported."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(f"model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
    return importlib.import_module(f"{__name__}.{FAMILIES[model_type]}")


def load_config(path):
    """The family config of the model directory `path`."""
    raw = read_config(path)
    return family_of(raw).Config.from_dict(raw)


def load_model(path, device="cpu", xp=None):
    """Load config.json and the safetensors weights of an HF-layout directory, strictly.

    `device` picks the array namespace; `xp` overrides it (the tests pass array_api_strict).
    """
    xp = xp or namespace(device)
    if device == "cpu":
        keep_freed_memory()  # a CPU forward pass reuses large short-lived arrays (see xp.py)
    raw = read_config(path)
    family = family_of(raw)
    config = family.Config.from_dict(raw)
    tensors = read_checkpoint(path, family.expected_shapes(config))
    return Model(config, family.load_weights(tensors, config, xp), xp, family)


def forward(model, tokens, caches, all_logits=False):
    """Run new tokens of one or more sequences through the model (see the family's forward)."""
    return model.family.forward(model, tokens, caches, all_logits)


def output_logits(model, x):
    """The final norm and output head on residual-stream rows x [N, D] (see the family's output_logits)."""
    return model.family.output_logits(model, x)
