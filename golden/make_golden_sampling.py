"""Write golden/sampling_cases.json: Hugging Face's own logits processors on fixed logits.

Run by `make golden` (or `python golden/make_golden_sampling.py`); never edit the output.

Each case is one row of seeded float32 logits (vocabularies of 50 and 1,000 tokens, no two
equal), the ids already seen (prompt and generated), and sampling parameters. transformers'
processors are applied in the order its generate() builds them:

  SequenceBiasLogitsProcessor      the logit_bias, as single-token sequences {(id,): bias}
  RepetitionPenaltyLogitsProcessor over the seen ids
  TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper

The processors run on a float64 copy of the float32 logits, because refimpl's sampler works
in float64: in float32 the rounding of logits / T alone moves a probability by up to ~1e-6,
the test's whole tolerance. A float32 run is made too, and must keep the same tokens.

Each case records:
  logits        float32 values, each written as the shortest decimal that reads back to the
                same float32; null stands for -inf (a token the model rules out)
  seen_ids      input_ids given to the processors (only the repetition penalty reads them)
  params        temperature, top_k, top_p, min_p, repetition_penalty, and logit_bias as
                [token id, bias] pairs (JSON keys could only be strings)
  kept_ids      the tokens whose processed score is not -inf, ascending
  kept_probs    softmax of the processed scores at those ids (every other token has 0)
  margins       how far the case is from a top-p or min-p boundary (so that float32 or a
                different summation order cannot flip a token in or out)
"""

import datetime
import json
import platform
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

OUT = Path(__file__).resolve().parent / "sampling_cases.json"
SCRIPT = "golden/make_golden_sampling.py"
MIN_MARGIN = 1e-6  # no kept probability mass or min-p ratio this close to its threshold

# name -> (vocabulary size, logit scale, parameters, how many ids are seen, how many logits are -inf)
CASES = {
    "plain": (50, 2.0, {}, 0, 0),
    "temperature_0.7": (1000, 3.0, {"temperature": 0.7}, 0, 0),
    "temperature_1.8": (50, 2.0, {"temperature": 1.8}, 0, 0),
    "temperature_0.2": (1000, 3.0, {"temperature": 0.2}, 0, 0),
    "top_k_1": (50, 2.0, {"top_k": 1}, 0, 0),
    "top_k_5": (50, 2.0, {"top_k": 5}, 0, 0),
    "top_k_40_temperature_0.9": (1000, 3.0, {"temperature": 0.9, "top_k": 40}, 0, 0),
    "top_k_above_vocab": (50, 2.0, {"top_k": 80}, 0, 0),
    "top_p_0.9": (1000, 3.0, {"top_p": 0.9}, 0, 0),
    "top_p_0.5_temperature_1.5": (50, 2.0, {"temperature": 1.5, "top_p": 0.5}, 0, 0),
    "top_p_0.05": (1000, 3.0, {"top_p": 0.05}, 0, 0),
    "top_p_0.99": (50, 2.0, {"top_p": 0.99}, 0, 0),
    "min_p_0.05": (1000, 3.0, {"min_p": 0.05}, 0, 0),
    "min_p_0.3_temperature_1.3": (50, 2.0, {"temperature": 1.3, "min_p": 0.3}, 0, 0),
    "repetition_1.3": (50, 2.0, {"repetition_penalty": 1.3}, 12, 0),
    "repetition_0.8_rewards": (1000, 3.0, {"repetition_penalty": 0.8}, 40, 0),
    "logit_bias": (50, 2.0, {"logit_bias": [[3, 4.5], [7, -2.25], [11, -100.0], [20, 1.0]]}, 0, 0),
    "logit_bias_forces": (1000, 3.0, {"temperature": 1.2, "logit_bias": [[123, 100.0]]}, 0, 0),
    "bias_then_repetition": (50, 2.0, {"repetition_penalty": 1.5,
                                       "logit_bias": [[3, 2.5], [4, -3.0], [5, 6.0]]}, 10, 0),
    "all_filters": (1000, 3.0, {"temperature": 0.8, "top_k": 50, "top_p": 0.9, "min_p": 0.02,
                                "repetition_penalty": 1.1}, 30, 0),
    "all_filters_and_bias": (50, 2.0, {"temperature": 1.2, "top_k": 20, "top_p": 0.8, "min_p": 0.1,
                                       "repetition_penalty": 1.2, "logit_bias": [[9, 3.0], [30, -1.5]]}, 8, 0),
    "minus_inf_logits": (50, 2.0, {"temperature": 0.9, "top_p": 0.95, "repetition_penalty": 1.25}, 10, 12),
}

DEFAULTS = {"temperature": 1.0, "top_k": None, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
            "logit_bias": []}


def case_inputs(index, vocab_size, scale, n_seen, n_minus_inf):
    """Seeded float32 logits with no two equal, some set to -inf; seen ids include the top three."""
    rng = np.random.default_rng(5000 + index)
    logits = (scale * rng.standard_normal(vocab_size)).astype(np.float32)  # [V]
    assert len(np.unique(logits)) == vocab_size, "two logits are equal: pick another seed"
    logits[rng.choice(vocab_size, size=n_minus_inf, replace=False)] = -np.inf
    top3 = np.argsort(-logits)[:3].tolist() if n_seen else []
    seen = top3 + rng.integers(0, vocab_size, size=max(n_seen - 3, 0)).tolist()  # repeats allowed
    return logits, seen


def processors(params):
    """transformers' processors for these parameters, in the order generate() applies them."""
    out = []
    if params["logit_bias"]:
        out.append(SequenceBiasLogitsProcessor(sequence_bias={(t,): b for t, b in params["logit_bias"]}))
    if params["repetition_penalty"] != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(penalty=params["repetition_penalty"]))
    if params["temperature"] != 1.0:
        out.append(TemperatureLogitsWarper(params["temperature"]))
    if params["top_k"] is not None:
        out.append(TopKLogitsWarper(top_k=params["top_k"]))
    if params["top_p"] < 1.0:
        out.append(TopPLogitsWarper(top_p=params["top_p"]))
    if params["min_p"] > 0.0:
        out.append(MinPLogitsWarper(min_p=params["min_p"]))
    return out


def run(params, logits, seen, dtype):
    """The processed scores [V] and the scores that entered top-p and min-p."""
    input_ids = torch.tensor([seen if seen else [0]])  # [1, S]; unread without a repetition penalty
    scores = torch.from_numpy(logits).to(dtype)[None, :]  # [1, V]
    entering = {}
    for p in processors(params):
        entering[type(p).__name__] = scores[0].clone()
        scores = p(input_ids, scores)
    return scores[0], entering


def margins(params, entering):
    """Distance of the closest token to the top-p mass threshold and to the min-p ratio threshold."""
    out = {}
    if "TopPLogitsWarper" in entering:
        probs = torch.softmax(entering["TopPLogitsWarper"], dim=-1).numpy()
        probs = np.sort(probs[probs > 0])[::-1]
        mass_before = np.concatenate([[0.0], np.cumsum(probs)[:-1]])  # of the more likely tokens
        out["top_p"] = float(np.abs(mass_before - params["top_p"]).min())
    if "MinPLogitsWarper" in entering:
        probs = torch.softmax(entering["MinPLogitsWarper"], dim=-1).numpy()
        ratio = probs[probs > 0] / probs.max()
        out["min_p"] = float(np.abs(ratio - params["min_p"]).min())
    return out


def made_by():
    return {
        "command": "make golden", "script": SCRIPT,
        "python": platform.python_version(),
        "torch": torch.__version__, "transformers": version("transformers"), "numpy": np.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu", "dtype": "float64 processing of float32 logits",
        "source": "numpy default_rng(5000 + case index)",
    }


def float32_json(x):
    """A float32 as the shortest decimal that reads back to it; -inf as null."""
    return None if np.isneginf(x) else float(np.format_float_positional(np.float32(x), unique=True))


def main():
    cases = []
    for index, (name, (vocab_size, scale, given, n_seen, n_minus_inf)) in enumerate(CASES.items()):
        params = DEFAULTS | given
        logits, seen = case_inputs(index, vocab_size, scale, n_seen, n_minus_inf)
        scores, entering = run(params, logits, seen, torch.float64)
        kept = torch.isfinite(scores).numpy()  # filtered tokens are -inf
        probs = torch.softmax(scores, dim=-1).numpy()
        finite = scores[kept].numpy()
        assert len(np.unique(finite)) == len(finite), f"{name}: processed scores tie: pick another seed"
        margin = margins(params, entering)
        assert all(m > MIN_MARGIN for m in margin.values()), f"{name}: too close to a threshold {margin}"
        scores32, _ = run(params, logits, seen, torch.float32)
        assert np.array_equal(torch.isfinite(scores32).numpy(), kept), f"{name}: float32 keeps other tokens"
        diff32 = np.abs(torch.softmax(scores32, dim=-1).double().numpy() - probs).max()
        print(f"  {name}: V={vocab_size}, kept {int(kept.sum())}, margins {margin}, "
              f"float32 differs by {diff32:.2g}")
        cases.append({
            "name": name, "vocab_size": vocab_size,
            "logits": [float32_json(x) for x in logits],
            "seen_ids": seen,
            "params": params,
            "kept_ids": np.flatnonzero(kept).tolist(),
            "kept_probs": probs[kept].tolist(),
            "margins": margin,
        })
    OUT.write_text(json.dumps({"made_by": made_by(), "cases": cases}) + "\n")
    print(f"wrote {OUT.relative_to(OUT.parent.parent)} ({OUT.stat().st_size / 1e3:.0f} kB, {len(cases)} cases)")


if __name__ == "__main__":
    main()
