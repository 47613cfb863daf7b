"""The forward pass under array_api_strict gives what it gives under NumPy.

array_api_strict rejects every call outside the Array API standard, so a NumPy-only spelling in
the math (and hence a path that would break under CuPy) fails here, on a machine without a GPU.
Both namespaces compute with NumPy underneath, so the results agree to float32 rounding.
"""

import array_api_compat
import array_api_strict
import numpy as np
import pytest

from refimpl.models import forward, load_model

from conftest import GOLDEN, load_golden

TINY = sorted(p.name for p in (GOLDEN / "tiny").iterdir() if (p / "reference.json").exists())
TOLERANCE = 1e-6


def run(model, ids):
    """Every output a user can ask for: prompt logits, two cached decode steps, a batch of two."""
    cache = model.new_cache(len(ids) + 2)
    outputs = [forward(model, [ids], [cache], all_logits=True)]  # [T, V]
    for token in ids[:2]:
        outputs.append(forward(model, [[token]], [cache]))  # [1, V]
    short, long_ = ids[: len(ids) // 3], ids
    caches = [model.new_cache(len(short) + 1), model.new_cache(len(long_) + 1)]
    outputs.append(forward(model, [short, long_], caches))  # [2, V]
    outputs.append(forward(model, [[ids[0]], [ids[1]]], caches))  # [2, V]: both decode, batched attention
    return outputs


@pytest.mark.parametrize("name", TINY)
def test_strict_namespace_matches_numpy(name):
    ids = max((c["input_ids"] for c in load_golden(f"tiny/{name}/reference.json")["cases"]), key=len)
    strict = run(load_model(GOLDEN / "tiny" / name, xp=array_api_strict), ids)
    reference = run(load_model(GOLDEN / "tiny" / name), ids)
    for what, ours, theirs in zip(["full pass", "decode step 1", "decode step 2", "batch of two", "batched decode"],
                                  strict, reference, strict=True):
        assert array_api_compat.array_namespace(ours) is array_api_strict, f"{what}: left the strict namespace"
        assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} vs {theirs.shape}"
        diff = np.abs(np.asarray(ours) - np.asarray(theirs)).max()
        assert diff <= TOLERANCE, f"{name} {what}: max |Δ logit| = {diff:.3g} > {TOLERANCE}"
