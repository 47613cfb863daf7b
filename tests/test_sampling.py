"""The sampler: against Hugging Face's logits processors, by property, by statistics, by validation.

golden/sampling_cases.json was made by golden/make_golden_sampling.py (transformers' own
processors on fixed float32 logits); regenerate it with `make golden`, never by hand.
"""

import json
import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from refimpl.sampling import (MAX_STOP_CHARS, InvalidParameter, SamplingParams, apply_penalties, filter_mask, sample,
                              softmax)

from conftest import GOLDEN, load_golden

PROB_TOLERANCE = 1e-6  # max |Δ probability| against transformers
SUM_TOLERANCE = 1e-6
PROPERTY = settings(max_examples=500, deadline=None)

GOLDEN_FILE = GOLDEN / "sampling_cases.json"
CASES = json.loads(GOLDEN_FILE.read_text())["cases"] if GOLDEN_FILE.exists() else []


# ---------------------------------------------------------------- against transformers

def params_of(case):
    p = case["params"]
    return SamplingParams(temperature=p["temperature"], top_k=p["top_k"], top_p=p["top_p"], min_p=p["min_p"],
                          repetition_penalty=p["repetition_penalty"],
                          logit_bias={token: bias for token, bias in p["logit_bias"]})


def logits_of(case):
    """The float32 logits as the golden file stores them (null is -inf)."""
    return np.array([-np.inf if x is None else x for x in case["logits"]], dtype=np.float32)  # [V]


def pipeline(logits, params, seen):
    """refimpl's steps 1-7 without the draw: the kept mask and the renormalised probabilities."""
    probs = softmax(apply_penalties(logits, params, seen, {}), params.temperature)
    kept = filter_mask(probs, params)
    weights = np.where(kept, probs, 0.0)
    return kept, weights / weights.sum()


def test_golden_sampling_covers_what_the_issue_asks():
    golden = load_golden("sampling_cases.json")
    cases = golden["cases"]
    assert golden["made_by"]["script"] == "golden/make_golden_sampling.py"
    assert len(cases) >= 20
    assert {c["vocab_size"] for c in cases} >= {50, 1000}
    defaults = {"temperature": 1.0, "top_k": None, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
                "logit_bias": []}
    used = {name for c in cases for name, value in c["params"].items() if value != defaults[name]}
    assert used == set(defaults)  # every parameter is exercised
    for c in cases:  # no exact ties among the finite logits
        finite = [x for x in c["logits"] if x is not None]
        assert len(set(finite)) == len(finite), c["name"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_pipeline_matches_transformers(case):
    logits = logits_of(case)
    params = params_of(case).validate(logits.size)
    kept, probs = pipeline(logits, params, case["seen_ids"])
    np.testing.assert_array_equal(np.flatnonzero(kept), case["kept_ids"],
                                  err_msg=f"{case['name']}: refimpl keeps other tokens than transformers")
    theirs = np.zeros(logits.size)
    theirs[case["kept_ids"]] = case["kept_probs"]
    diff = np.abs(probs - theirs)
    worst = int(diff.argmax())
    assert diff.max() <= PROB_TOLERANCE, (
        f"{case['name']}: max |Δ probability| = {diff.max():.3g} > {PROB_TOLERANCE} at token {worst} "
        f"(ours {probs[worst]:.9f}, transformers {theirs[worst]:.9f}); "
        "if transformers' processors legitimately changed, regenerate with `make golden`")
    # sample() runs the same pipeline: what it draws is one of the kept tokens.
    step = sample(logits, params, np.random.default_rng(0), seen=case["seen_ids"])
    assert kept[step.token]
    np.testing.assert_array_equal(step.kept, kept)


# ---------------------------------------------------------------- properties

WILD = st.one_of(st.floats(-50, 50), st.sampled_from([1e30, -1e30, -math.inf]))
TEMPERATURES = st.one_of(st.just(0.0), st.sampled_from([5e-324, 1e-300, 1e-6]), st.floats(0, 2))


@st.composite
def wild_rows(draw, min_size=1, max_size=64):
    """A logits row [V] of ordinary values, ±1e30 and -inf, at least one of them finite."""
    row = np.array(draw(st.lists(WILD, min_size=min_size, max_size=max_size)), dtype=np.float64)
    assume(np.isfinite(row).any())
    return row


@st.composite
def any_params(draw, vocab_size):
    """Every parameter in its valid range, tiny temperatures included."""
    return SamplingParams(
        temperature=draw(TEMPERATURES),
        top_k=draw(st.one_of(st.none(), st.integers(-1, vocab_size + 2))),
        top_p=draw(st.floats(0, 1, exclude_min=True)),
        min_p=draw(st.floats(0, 1)),
        presence_penalty=draw(st.floats(-2, 2)),
        frequency_penalty=draw(st.floats(-2, 2)),
        # Extremes too: 1e30 / 5e-324 overflows to +inf, and -1e30 * 1e300 to -inf.
        repetition_penalty=draw(st.one_of(st.floats(0.01, 10), st.floats(0, 1e300, exclude_min=True))),
        logit_bias=draw(st.dictionaries(st.integers(0, vocab_size - 1), st.floats(-100, 100), max_size=4)),
    ).validate(vocab_size)


@st.composite
def row_params_history(draw):
    row = draw(wild_rows())
    params = draw(any_params(row.size))
    generated = draw(st.lists(st.integers(0, row.size - 1), max_size=8))
    prompt = draw(st.lists(st.integers(0, row.size - 1), max_size=8))
    return row, params, prompt + generated, Counter(generated)


@PROPERTY
@given(row_params_history(), st.integers(0, 2**32))
def test_probabilities_are_a_distribution(case, seed):
    row, params, seen, counts = case
    step = sample(row, params, np.random.default_rng(seed), seen=seen, generated_counts=counts)
    kept_probs = np.where(step.kept, step.probs, 0.0)
    for probs in (step.probs, kept_probs / kept_probs.sum()):
        assert np.isfinite(probs).all() and (probs >= 0).all()
        assert abs(probs.sum() - 1) <= SUM_TOLERANCE
    assert step.kept[step.token] and step.probs[step.token] > 0
    # Whatever else is on, top-k and min-p hold for the kept set.
    if not params.greedy and params.top_k and params.top_k > 0:
        assert step.kept.sum() <= params.top_k
    assert (step.probs[step.kept] >= params.min_p * step.probs[step.kept].max()).all()


@PROPERTY
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=32))
def test_temperature_zero_is_argmax_with_ties_to_the_lowest_id(values):
    row = np.array(values, dtype=np.float64)  # small integers: ties are common
    step = sample(row, SamplingParams(temperature=0), np.random.default_rng(0))
    assert step.token == min(np.flatnonzero(row == row.max()))
    assert step.kept.sum() == 1 and step.probs[step.token] == 1


def filtered(row, temperature, **filters):
    """probs after temperature and the kept mask, with only the given filters on."""
    params = SamplingParams(temperature=temperature, **filters).validate(row.size)
    probs = softmax(apply_penalties(row, params, (), {}), params.temperature)
    return probs, filter_mask(probs, params)


ROWS_WITH_TIES = st.lists(st.one_of(st.integers(-4, 4).map(float), st.floats(-20, 20), st.just(-math.inf)),
                          min_size=1, max_size=64).map(np.array).filter(lambda r: np.isfinite(r).any())
POSITIVE_TEMPERATURES = st.floats(0.05, 2)


@PROPERTY
@given(ROWS_WITH_TIES, POSITIVE_TEMPERATURES, st.integers(1, 70))
def test_top_k_keeps_the_k_most_likely(row, temperature, k):
    probs, kept = filtered(row, temperature, top_k=k)
    assert kept.sum() <= k
    assert kept.sum() == min(k, (probs > 0).sum())  # exactly k where k tokens are possible
    dropped = ~kept & (probs > 0)
    if dropped.any():
        assert probs[kept].min() >= probs[dropped].max()
        kept_of_tied = kept[probs == probs[kept].min()]  # in id order
        assert kept_of_tied[:kept_of_tied.sum()].all()  # ties at the boundary go to the lower ids


@PROPERTY
@given(ROWS_WITH_TIES, POSITIVE_TEMPERATURES, st.floats(0, 1, exclude_min=True))
def test_top_p_keeps_the_smallest_likely_prefix_reaching_p(row, temperature, p):
    probs, kept = filtered(row, temperature, top_p=p)
    order = sorted(np.flatnonzero(probs > 0), key=lambda i: (-probs[i], i))  # most likely first
    assert sorted(np.flatnonzero(kept)) == sorted(order[:kept.sum()])  # a prefix of that order
    total, mass = probs.sum(), probs[kept].sum()
    last = probs[order[kept.sum() - 1]]
    slack = 1e-12 * total  # summation order only
    assert mass >= p * total - slack  # it reaches p ...
    assert mass - last < p * total + slack  # ... and without its last member it would not


@pytest.mark.parametrize("top_p, kept", [(0.5, [0]), (0.75, [0, 1]), (0.8, [0, 1, 2]), (0.875, [0, 1, 2]),
                                         (0.9, [0, 1, 2, 3])])
def test_top_p_at_an_exact_boundary(top_p, kept):
    """Mass exactly p is enough, as in transformers (which drops a token when the mass of it and
    every less likely token is <= 1 - p). Of the two tokens tied at 1/8 the lower id comes first,
    as everywhere in refimpl (transformers' sort leaves ties in no promised order)."""
    probs = np.array([0.5, 0.25, 0.125, 0.125])  # dyadic: every partial sum is exact
    assert np.flatnonzero(filter_mask(probs, SamplingParams(top_p=top_p))).tolist() == kept


@PROPERTY
@given(ROWS_WITH_TIES, POSITIVE_TEMPERATURES, st.floats(0, 1))
def test_min_p_keeps_tokens_at_least_min_p_times_the_top(row, temperature, min_p):
    probs, kept = filtered(row, temperature, min_p=min_p)
    threshold = min_p * probs.max()
    assert (probs[kept] >= threshold).all()
    np.testing.assert_array_equal(kept, (probs > 0) & (probs >= threshold))  # and all of those


@PROPERTY
@given(row_params_history(), st.integers(0, 2**63))
def test_same_seed_same_tokens(case, seed):
    row, params, seen, counts = case

    def draws():
        rng = np.random.default_rng(seed)
        return [sample(row, params, rng, seen=seen, generated_counts=counts).token for _ in range(5)]

    assert draws() == draws()


SPREAD_WITHIN_20 = st.lists(st.floats(-10, 10), min_size=2, max_size=64).map(np.array)


@PROPERTY
@given(SPREAD_WITHIN_20, st.data(), st.one_of(st.just(0.0), POSITIVE_TEMPERATURES), st.integers(0, 2**32))
def test_bias_plus_100_forces_and_minus_100_bans(row, data, temperature, seed):
    j = data.draw(st.integers(0, row.size - 1))
    top_p = data.draw(st.floats(0, 1, exclude_min=True))
    forced = sample(row, SamplingParams(temperature=temperature, top_p=top_p, logit_bias={j: 100}),
                    np.random.default_rng(seed))
    assert forced.token == j and forced.probs[j] > 1 - 1e-12
    banned = sample(row, SamplingParams(temperature=temperature, top_p=top_p, logit_bias={j: -100}),
                    np.random.default_rng(seed))
    assert banned.token != j and banned.probs[j] < 1e-15


def test_overflowing_repetition_penalty_still_gives_a_distribution():
    """Divided or multiplied by an extreme penalty, a finite logit stays finite (the largest float)."""
    rng = np.random.default_rng(0)
    tiny = SamplingParams(repetition_penalty=5e-324, temperature=0.7).validate(4)
    step = sample(np.array([1.0, 30.0, 2.0, -5.0]), tiny, rng, seen=[0, 2, 3])
    np.testing.assert_array_equal(step.probs, [0.5, 0, 0.5, 0])  # 1 and 2 both become the largest float
    assert step.token in (0, 2)
    huge = SamplingParams(repetition_penalty=1e300).validate(2)
    step = sample(np.array([-1e30, -np.inf]), huge, rng, seen=[0, 1])
    np.testing.assert_array_equal(step.probs, [1, 0])  # -1e330 would be -inf: no finite logit left


def test_tiny_temperature_does_not_overflow():
    """1e30 / 1e-300 is inf; the sampler must still give a distribution (the most likely token)."""
    step = sample(np.array([-1e30, 1e30, 0.0, -np.inf]), SamplingParams(temperature=1e-300), np.random.default_rng(0))
    np.testing.assert_array_equal(step.probs, [0, 1, 0, 0])
    assert step.token == 1


# ---------------------------------------------------------------- statistics

# Critical values of the chi-square distribution at significance 0.001 (upper tail), from
# the standard table: df 9 -> 27.877, df 4 -> 18.467. With a fixed seed the test is
# deterministic; a correct sampler fails it for one seed in a thousand.
CHI2_CRITICAL_0_001 = {9: 27.877, 4: 18.467}
DRAWS = 20_000


def chi_square(counts, expected_probs):
    expected = DRAWS * np.asarray(expected_probs)
    assert expected.min() >= 5  # the chi-square approximation needs enough expected counts
    return float(((counts - expected) ** 2 / expected).sum())


def draw_counts(logits, params, seed):
    rng = np.random.default_rng(seed)
    tokens = [sample(logits, params, rng).token for _ in range(DRAWS)]
    return np.bincount(tokens, minlength=len(logits))


def test_draws_follow_the_distribution_chi_square():
    p = np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05, 0.03, 0.015, 0.005])
    counts = draw_counts(np.log(p), SamplingParams(), seed=20240601)
    statistic = chi_square(counts, p)
    assert statistic < CHI2_CRITICAL_0_001[9], f"chi-square {statistic:.2f} with 9 degrees of freedom; counts {counts}"


def test_filtered_draws_follow_the_renormalised_distribution_chi_square():
    """Temperature 0.5 and top-k 5: the five most likely tokens in proportion to p^2."""
    logits = np.log([0.05, 0.3, 0.02, 0.2, 0.15, 0.01, 0.12, 0.1, 0.05])
    expected = np.exp(2 * logits)
    expected[np.argsort(-logits)[5:]] = 0
    expected /= expected.sum()
    counts = draw_counts(logits, SamplingParams(temperature=0.5, top_k=5), seed=7)
    assert counts[expected == 0].sum() == 0
    statistic = chi_square(counts[expected > 0], expected[expected > 0])
    assert statistic < CHI2_CRITICAL_0_001[4], f"chi-square {statistic:.2f} with 4 degrees of freedom; counts {counts}"


# ---------------------------------------------------------------- validation

VOCAB = 100
NAN = float("nan")

BAD = [
    ({"temperature": -0.1}, "temperature"), ({"temperature": 2.5}, "temperature"),
    ({"temperature": NAN}, "temperature"), ({"temperature": True}, "temperature"),
    ({"temperature": "1"}, "temperature"), ({"temperature": None}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": NAN}, "top_p"), ({"top_p": True}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"top_k": 2.0}, "top_k"), ({"top_k": True}, "top_k"),
    ({"min_p": -0.1}, "min_p"), ({"min_p": 1.1}, "min_p"), ({"min_p": NAN}, "min_p"), ({"min_p": False}, "min_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"presence_penalty": -math.inf}, "presence_penalty"),
    ({"presence_penalty": True}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"), ({"frequency_penalty": NAN}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"repetition_penalty": NAN}, "repetition_penalty"), ({"repetition_penalty": True}, "repetition_penalty"),
    ({"logit_bias": {VOCAB: 1}}, "logit_bias"), ({"logit_bias": {-1: 1}}, "logit_bias"),
    ({"logit_bias": {"5": 1}}, "logit_bias"), ({"logit_bias": {True: 1}}, "logit_bias"),
    ({"logit_bias": {5: 101}}, "logit_bias"), ({"logit_bias": {5: NAN}}, "logit_bias"),
    ({"logit_bias": {5: True}}, "logit_bias"), ({"logit_bias": [5, 1]}, "logit_bias"),
    ({"seed": 1.5}, "seed"), ({"seed": True}, "seed"), ({"seed": -1}, "seed"), ({"seed": "42"}, "seed"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -5}, "max_tokens"), ({"max_tokens": 1.0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"n": 0}, "n"), ({"n": 129}, "n"), ({"n": 2.0}, "n"), ({"n": True}, "n"),
    ({"stop": [""]}, "stop"), ({"stop": ["x"] * 17}, "stop"), ({"stop": [1]}, "stop"), ({"stop": 5}, "stop"),
    # The API takes stop token ids within `stop` (webapp/common.py splits them out).
    ({"stop_token_ids": [VOCAB]}, "stop"), ({"stop_token_ids": [-1]}, "stop"), ({"stop_token_ids": [True]}, "stop"),
    ({"stop_token_ids": 3}, "stop"),
    ({"logprobs": 1}, "logprobs"), ({"logprobs": "true"}, "logprobs"),
    ({"top_logprobs": 21}, "top_logprobs"), ({"top_logprobs": -1}, "top_logprobs"),
    ({"top_logprobs": True}, "top_logprobs"), ({"top_logprobs": 2.0}, "top_logprobs"),
]


@pytest.mark.parametrize("kwargs, param", BAD, ids=[repr(k) for k, _ in BAD])
def test_each_bad_value_names_its_parameter(kwargs, param):
    with pytest.raises(InvalidParameter) as error:
        SamplingParams(**kwargs).validate(VOCAB)
    assert error.value.param == param
    assert param in str(error.value)


GOOD = [
    {}, {"temperature": 0}, {"temperature": 2}, {"top_p": 1}, {"top_p": 1e-9}, {"top_k": None}, {"top_k": 0},
    {"top_k": -1}, {"top_k": 1000}, {"min_p": 0}, {"min_p": 1}, {"presence_penalty": -2}, {"frequency_penalty": 2},
    {"repetition_penalty": 1e-3}, {"logit_bias": {0: -100, VOCAB - 1: 100}}, {"seed": 0}, {"seed": 2**70},
    {"max_tokens": 1}, {"n": 128}, {"stop": ["\n"] * 16}, {"stop": "END"}, {"stop_token_ids": [0, VOCAB - 1]},
    {"logprobs": True, "top_logprobs": 20},
]


@pytest.mark.parametrize("kwargs", GOOD, ids=[repr(k) for k in GOOD])
def test_values_at_the_edges_are_accepted(kwargs):
    SamplingParams(**kwargs).validate(VOCAB)


@pytest.mark.parametrize("lengths", [[MAX_STOP_CHARS + 1], [MAX_STOP_CHARS // 2 + 1] * 2, [3, 65_000]],
                         ids=["one-over", "two-together-over", "65000"])
def test_stop_strings_over_the_total_length_limit_are_refused_naming_limit_and_total(lengths):
    """A 65,000-character stop string once stalled every stream of the server; now it is a 400."""
    with pytest.raises(InvalidParameter) as error:
        SamplingParams(stop=["x" * n for n in lengths]).validate(VOCAB)
    assert error.value.param == "stop"
    assert f"at most {MAX_STOP_CHARS} characters" in str(error.value) and f"total {sum(lengths)}" in str(error.value)


def test_stop_strings_up_to_the_total_length_limit_are_accepted():
    SamplingParams(stop=["x" * (MAX_STOP_CHARS // 2)] * 2).validate(VOCAB)


def test_one_stop_string_is_a_list_of_one():
    assert SamplingParams(stop="END").stop == ["END"]
