"""Batch invariance: a request's bits do not depend on what else runs beside it (refimpl/batching.py).

Every comparison of two runs here is exact (==), never a tolerance: the claim is that the same
request gets the same float32 arithmetic in the same order whatever shares its steps. The two runs
compared are always on the same machine, in the same process, so the claim holds whichever CPU and
BLAS kernels run the suite.
"""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refimpl.batching import Batch
from refimpl.engine import Engine
from refimpl.generate import generate, prompt_logprobs
from refimpl.kv_cache import KVCache
from refimpl.models import forward, load_model
from refimpl.ops import KEY_BLOCK, attention, rowwise_matmul
from refimpl.sampling import SamplingParams
from refimpl.xp import namespace

xp = namespace("cpu")


class FakeCache:
    """What Batch.of reads of a KVCache, without the arrays."""
    decodes = KVCache.decodes

    def __init__(self, length, prompt_length):
        self.length, self.prompt_length = length, prompt_length


def test_a_row_gets_the_same_bits_in_any_batch():
    """Batch.matmul: a prompt row and a decoding row, each beside other rows in varied numbers and
    at varied positions, equal the same row alone."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((96, 200), dtype=np.float32)
    rows = rng.standard_normal((300, 96), dtype=np.float32)

    def product(spans):
        """spans: (rows, start position, prompt length) per sequence -> that batch's products per sequence."""
        batch = Batch.of(xp, [[0] * len(r) for r, _, _ in spans], [FakeCache(s, p) for _, s, p in spans])
        y = batch.matmul(np.concatenate([r for r, _, _ in spans]), W)
        return [y[lo:hi] for lo, hi, _ in batch.spans]

    prompt, decoding = rows[:70], rows[70:71]
    alone_prompt = product([(prompt, 5, None)])[0]  # positions 5..74 of a prompt
    alone_decoding = product([(decoding, 40, 10)])[0]  # position 40, after a 10-token prompt
    np.testing.assert_allclose(np.concatenate([alone_prompt, alone_decoding]), rows[:71] @ W, rtol=1e-4, atol=1e-3)
    for companions in (0, 1, 7, 20):
        others = [(rows[100 + 8 * i:100 + 8 * i + 1 + i % 3 * 3], 3 * i, None if i % 2 else 0)
                  for i in range(companions)]
        got = product(others[:companions // 2] + [(prompt, 5, None), (decoding, 40, 10)] + others[companions // 2:])
        assert np.array_equal(got[companions // 2], alone_prompt)
        assert np.array_equal(got[companions // 2 + 1], alone_decoding)
    # The same prompt rows cut into other chunks: each row keeps its tile slot, so its bits.
    for cut in (1, 31, 32, 33, 50):
        first, second = product([(prompt[:cut], 5, None)])[0], product([(prompt[cut:], 5 + cut, None)])[0]
        assert np.array_equal(np.concatenate([first, second]), alone_prompt)


def test_rowwise_products_do_not_depend_on_the_row_count():
    rng = np.random.default_rng(1)
    for K, M in [(64, 48), (96, 9000)]:  # 9000 columns: multiplied in column blocks
        W = rng.standard_normal((K, M), dtype=np.float32)
        x = rng.standard_normal((17, K), dtype=np.float32)
        alone = np.concatenate([rowwise_matmul(xp, x[i:i + 1], W) for i in range(17)])
        assert np.array_equal(rowwise_matmul(xp, x, W), alone)
        np.testing.assert_allclose(alone, x @ W, rtol=1e-4, atol=1e-3)


def test_a_query_gets_the_same_bits_alone_or_in_any_chunk():
    rng = np.random.default_rng(2)
    T, H, Hkv, Dh = 2 * KEY_BLOCK + 9, 6, 2, 16
    q = rng.standard_normal((T, H, Dh), dtype=np.float32)
    k, v = rng.standard_normal((2, Hkv, T, Dh), dtype=np.float32)
    for window in (None, 20):
        whole = attention(xp, q, k, v, 0, window)
        for t in (0, KEY_BLOCK - 1, KEY_BLOCK, T - 1):  # one query, as a chunk of one token
            assert np.array_equal(attention(xp, q[t:t + 1], k, v, t, window)[0], whole[t])
        for lo, hi in ((3, 70), (64, 130), (100, T)):  # a chunk of the prompt
            assert np.array_equal(attention(xp, q[lo:hi], k, v, lo, window), whole[lo:hi])


# ---------------------------------------------------------------- the engine, driven step by step


def run(model, tokenizer, stop_ids, arrivals, chunk):
    """Run (arrival step, prompt, params, score_top) requests on a fresh engine, stepping it by hand;
    return each request's (events, prompt logprobs)."""
    engine = Engine(model, tokenizer, stop_ids, max_seqs=16, max_queue=64, prefill_chunk=chunk, thread=False)
    requests, step = [None] * len(arrivals), 0
    while any(r is None for r in requests) or engine.running or engine.waiting:
        for i, (at, prompt, params, score_top) in enumerate(arrivals):
            if at == step:
                requests[i] = engine.submit(prompt, params, score_top)
        engine.run_step()
        step += 1
    return [(list(r), r.prompt_logprobs) for r in requests]


def event_bits(events):
    """Everything a client sees of the events, floats as their exact values."""
    return [(e.index, e.token_id, e.text, e.finish_reason, e.offset,
             None if e.logprobs is None else (e.logprobs.logprob, [(t.token_id, t.logprob) for t in e.logprobs.top]))
            for e in events]


def scored_bits(entries):
    return [None if e is None else (e.token_id, e.logprob, [(t.token_id, t.logprob) for t in e.top]) for e in entries]


def params_strategy():
    return st.builds(
        SamplingParams,
        temperature=st.sampled_from([0.0, 0.7, 1.0, 1.5]),
        top_p=st.sampled_from([1.0, 0.9]),
        top_k=st.sampled_from([None, 5]),
        seed=st.integers(0, 2**32),
        max_tokens=st.integers(1, 12),
        n=st.integers(1, 3),
        logprobs=st.just(True),
        top_logprobs=st.integers(0, 4),
    )


@st.composite
def scenarios(draw):
    vocab = st.integers(3, 319)  # the tiny model's vocabulary, without its three special tokens
    shared = draw(st.lists(vocab, min_size=0, max_size=40))  # a prefix some prompts share (prefix cache)
    prompt = st.builds(lambda head, tail: head + tail, st.sampled_from([[], shared]),
                       st.lists(vocab, min_size=1, max_size=90))
    request = st.tuples(st.integers(0, 12), prompt, params_strategy(), st.sampled_from([None, None, 0, 3]))
    target = draw(request)
    companions = draw(st.lists(request, max_size=5))
    return target, companions, draw(st.sampled_from([7, 16, 40, 256])), draw(st.sampled_from([5, 33, 256]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios())
def test_a_request_gets_the_same_bits_beside_any_companions(tiny_chat_model, scenario):
    """The property: a target request, with random companions arriving at random steps (prefilling
    in chunks while it decodes, sharing prefixes, n > 1, echo scoring), produces exactly the events
    and prompt log-probabilities it produces alone, with other chunk sizes."""
    target, companions, chunk, alone_chunk = scenario
    model, tokenizer, stop_ids = tiny_chat_model
    position = len(companions) // 2
    together = run(model, tokenizer, stop_ids, companions[:position] + [target] + companions[position:], chunk)
    alone = run(model, tokenizer, stop_ids, [(0, *target[1:])], alone_chunk)
    (events, scored), (alone_events, alone_scored) = together[position], alone[0]
    assert event_bits(events) == event_bits(alone_events)
    assert (scored is None) == (alone_scored is None)
    if scored is not None:
        assert scored_bits(scored) == scored_bits(alone_scored)


def test_generate_and_score_give_the_servers_bits(tiny_chat_model):
    """The single-sequence path of `refimpl generate` and `refimpl score` (generate(), prompt_logprobs())
    equals the engine's, with other requests beside it."""
    model, tokenizer, stop_ids = tiny_chat_model
    prompt = list(range(10, 80))
    params = SamplingParams(temperature=0.9, seed=7, max_tokens=10, n=2, logprobs=True, top_logprobs=3)
    direct = list(generate(model, tokenizer, prompt, params, stop_ids))
    others = [(0, list(range(40, 140)), SamplingParams(max_tokens=15, n=3), None),
              (2, [5] * 30, SamplingParams(max_tokens=5), 2)]
    served = run(model, tokenizer, stop_ids, others + [(1, prompt, params, 3)], chunk=16)[-1]
    assert event_bits(served[0]) == event_bits(direct)
    assert scored_bits(served[1]) == scored_bits(prompt_logprobs(model, tokenizer, prompt, top=3))


TINY = Path(__file__).resolve().parent.parent / "golden" / "tiny"


@pytest.mark.parametrize("name", sorted(p.name for p in TINY.iterdir() if (p / "config.json").exists()))
def test_every_family_gives_the_same_bits_in_any_batch(name):
    assert_forward_is_batch_invariant(load_model(TINY / name))


def test_the_default_model_gives_the_same_bits_in_any_batch(default_model_dir):
    """Its width (576) takes NumPy paths the tiny models' (64) do not: a sum over a transposed
    view's rows comes out in other bits there (the tied embedding once returned one)."""
    assert_forward_is_batch_invariant(load_model(default_model_dir))


def assert_forward_is_batch_invariant(model):
    """One level down: forward() itself. A prompt scored whole equals it scored in chunks beside a
    decoding sequence; a decoding step alone equals it beside other decoding sequences and a
    prefilling one."""
    rng = np.random.default_rng(3)
    prompt, other = ([int(t) for t in rng.integers(0, model.config.vocab_size, n)] for n in (100, 70))

    alone = np.asarray(forward(model, [prompt], [model.new_cache(100)], all_logits=True))
    cache, beside = model.new_cache(100), model.new_cache(200, 20)
    forward(model, [other[:20]], [beside])
    rows = []
    for lo, hi in ((0, 1), (1, 40), (40, 41), (41, 100)):
        logits = forward(model, [prompt[lo:hi], [7]], [cache, beside], all_logits=True)
        rows.append(np.asarray(logits[:hi - lo]))
    assert np.array_equal(np.concatenate(rows), alone)

    def decoding(prompt_length):
        cache = model.new_cache(110, prompt_length)
        forward(model, [prompt[:prompt_length]], [cache])
        return cache

    first = np.asarray(forward(model, [[9]], [decoding(100)]))[0]
    caches = [decoding(60), decoding(100), decoding(90), model.new_cache(100)]
    steps = forward(model, [[5], [9], [11], other], caches)
    assert np.array_equal(np.asarray(steps[1]), first)
