"""refimpl/explain.py: what the token view shows, on rows small enough to check by hand."""

import math

import numpy as np
import pytest

from refimpl.explain import explain
from refimpl.sampling import SamplerStep, SamplingParams, sample


class ByteTokenizer:
    """Token i is the byte i; token 9 is a special marker."""
    special_ids = {9}

    def token_bytes(self, token_id):
        return b"" if token_id in self.special_ids else bytes([65 + token_id])

    def decode(self, ids):
        return "".join("<|end|>" if i in self.special_ids else chr(65 + i) for i in ids)


PROBS = [0.5, 0.2, 0.15, 0.1, 0.05]


def test_each_filter_is_named_where_it_removed_a_token():
    # top_k 4 drops 0.05; top_p 0.8 over the 0.95 left keeps 0.5, 0.2, 0.15 (their mass before
    # 0.1 is 0.85 / 0.95 = 0.895 >= 0.8); min_p 0.35 drops what is below 0.175 (0.15).
    params = SamplingParams(temperature=1.0, top_k=4, top_p=0.8, min_p=0.35)
    step = sample(np.log(PROBS), params, np.random.default_rng(0))
    insight = explain(ByteTokenizer(), np.log(PROBS), step, params, count=5)
    by_id = {a.token_id: a for a in insight.alternatives}
    assert [by_id[i].removed_by for i in range(5)] == [None, None, "min_p", "top_p", "top_k"]
    assert [by_id[i].kept for i in range(5)] == [True, True, False, False, False]
    assert insight.top_p_cut == {"top_p": 0.8, "mass": pytest.approx(0.85 / 0.95)}
    assert [a.p for a in insight.alternatives] == pytest.approx(PROBS)
    assert [a.p_temp for a in insight.alternatives] == pytest.approx(PROBS)  # temperature 1: unchanged
    assert insight.other_p == pytest.approx(0, abs=1e-12) and insight.other_p_temp == pytest.approx(0, abs=1e-12)
    assert step.token in (0, 1) and [a.chosen for a in insight.alternatives].count(True) == 1
    assert insight.p == pytest.approx(PROBS[step.token]) and insight.logprob == pytest.approx(math.log(insight.p))
    assert insight.rank == step.token + 1


def test_the_chosen_token_is_listed_even_below_the_top():
    params = SamplingParams(temperature=2.0)
    logits = np.log(PROBS)
    step = SamplerStep(token=3, probs=np.array(PROBS), kept=np.ones(5, dtype=bool))
    insight = explain(ByteTokenizer(), logits, step, params, count=2)
    assert [a.token_id for a in insight.alternatives] == [0, 1, 3]
    assert [a.chosen for a in insight.alternatives] == [False, False, True]
    assert insight.other_p == pytest.approx(0.15 + 0.05)  # the tokens not listed: 2 and 4
    assert insight.rank == 4 and insight.top_p_cut is None


def test_rank_breaks_ties_to_the_lower_id_and_specials_are_named():
    logits = np.array([1.0, 2.0, 2.0, 0.0, 0, 0, 0, 0, 0, 2.0])
    step = SamplerStep(token=2, probs=np.zeros(10), kept=np.zeros(10, dtype=bool))
    step.probs[2], step.kept[2] = 1.0, True
    insight = explain(ByteTokenizer(), logits, step, SamplingParams(temperature=0), count=3)
    assert insight.rank == 2  # token 1 is as likely and has the lower id
    assert [a.token_id for a in insight.alternatives] == [1, 2, 9]
    special = insight.alternatives[2]
    assert special.special and special.text == "<|end|>" and special.bytes == []
    assert [a.removed_by for a in insight.alternatives] == ["temperature", None, "temperature"]


def test_temperature_reshapes_only_the_sampled_distribution():
    params = SamplingParams(temperature=0.5)
    step = sample(np.log(PROBS), params, np.random.default_rng(1))
    insight = explain(ByteTokenizer(), np.log(PROBS), step, params, count=5)
    squared = np.square(PROBS) / np.square(PROBS).sum()  # p ** (1 / T), renormalised
    assert [a.p_temp for a in insight.alternatives] == pytest.approx(squared)
    assert [a.p for a in insight.alternatives] == pytest.approx(PROBS)
