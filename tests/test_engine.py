"""The batching engine: batched equals unbatched, shared prefill, prefix cache, bounds, cancellation, faults."""

import threading
import time

import numpy as np
import pytest

from refimpl.engine import Engine, EngineFull, RequestFailed
from refimpl.generate import Generation, generate
from refimpl.sampling import SamplingParams

from conftest import steps_before_a_near_tie


def make_engine(tiny_chat_model, **bounds):
    model, tokenizer, stop_ids = tiny_chat_model
    return Engine(model, tokenizer, stop_ids, **bounds)


def prompts(tokenizer, count):
    return [tokenizer.encode_chat([{"role": "user", "content": f"question {i}: " + "why? " * i}]) for i in range(count)]


def assert_same_greedy_tokens(events, alone):
    """One sequence's greedy events computed two ways (batched or alone, with a cached prefix or
    without), whose float32 results differ in the last bits: the same tokens up to a near-tie,
    log-probabilities within test_model_golden's tolerance. Both need logprobs with top_logprobs >= 2."""
    agree = steps_before_a_near_tie([[t.logprob for t in e.logprobs.top] for e in alone])
    assert [e.token_id for e in events[:agree]] == [e.token_id for e in alone[:agree]]
    np.testing.assert_allclose([e.logprobs.logprob for e in events[:agree]],
                               [e.logprobs.logprob for e in alone[:agree]], atol=1e-4, rtol=0)
    if agree == len(alone):
        assert [e.token_id for e in events] == [e.token_id for e in alone]


def collect(events):
    """Per choice: token ids and logprobs, in order."""
    tokens, logprobs = {}, {}
    for e in events:
        tokens.setdefault(e.index, []).append(e.token_id)
        if e.logprobs:
            logprobs.setdefault(e.index, []).append(e.logprobs.logprob)
    return tokens, logprobs


def run_concurrently(engine, jobs):
    """Submit every (ids, params) at once from its own thread; return each one's events."""
    results = [None] * len(jobs)

    def client(i, ids, params):
        results[i] = list(engine.submit(ids, params))

    threads = [threading.Thread(target=client, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_batched_results_equal_unbatched(tiny_chat_model):
    model, tokenizer, stop_ids = tiny_chat_model
    params = SamplingParams(temperature=0, max_tokens=20, logprobs=True, top_logprobs=2)
    jobs = [(ids, params) for ids in prompts(tokenizer, 6)]
    batched = run_concurrently(make_engine(tiny_chat_model, max_seqs=8), jobs)
    for (ids, _), events in zip(jobs, batched):
        assert_same_greedy_tokens(events, list(generate(model, tokenizer, ids, params, stop_ids)))


def test_sampled_choices_do_not_depend_on_batching(tiny_chat_model):
    model, tokenizer, stop_ids = tiny_chat_model
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7, n=3, max_tokens=12)
    ids = prompts(tokenizer, 1)[0]
    (events,) = run_concurrently(make_engine(tiny_chat_model), [(ids, params)])
    assert collect(events)[0] == collect(generate(model, tokenizer, ids, params, stop_ids))[0]


def test_n_choices_share_one_prefill(tiny_chat_model):
    engine = make_engine(tiny_chat_model, prefix_cache_tokens=0)
    ids = prompts(tiny_chat_model[1], 3)[2]
    events = list(engine.submit(ids, SamplingParams(temperature=1.0, seed=1, n=3, max_tokens=5)))
    assert {e.index for e in events} == {0, 1, 2}
    assert engine.stats["prompt_tokens_computed"] == len(ids)  # once, not three times


def test_prefix_cache_reuses_a_shared_prefix_and_changes_nothing(tiny_chat_model):
    model, tokenizer, stop_ids = tiny_chat_model
    system = {"role": "system", "content": "You are a terse assistant. " * 4}
    first = tokenizer.encode_chat([system, {"role": "user", "content": "hello"}])
    second = tokenizer.encode_chat([system, {"role": "user", "content": "goodbye"}])
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=True, top_logprobs=2)
    engine = make_engine(tiny_chat_model)
    list(engine.submit(first, params))
    computed = engine.stats["prompt_tokens_computed"]
    events = list(engine.submit(second, params))
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert engine.stats["prefix_hits"] == 1
    assert engine.stats["prompt_tokens_computed"] - computed == len(second) - shared
    assert_same_greedy_tokens(events, list(generate(model, tokenizer, second, params, stop_ids)))


def test_a_full_queue_is_refused_at_once(endless_chat_model):
    engine = make_engine(endless_chat_model, max_seqs=1, max_queue=2)
    ids = prompts(endless_chat_model[1], 1)[0]
    endless_reply = SamplingParams(temperature=0)  # nothing here ends before it is canceled
    running = engine.submit(ids, endless_reply)
    next(iter(running))  # admitted and decoding: the one sequence slot is taken
    held = [engine.submit(ids, endless_reply) for _ in range(2)]  # these two fill the queue
    with pytest.raises(EngineFull, match="max_queue 2"):
        engine.submit(ids, endless_reply)
    for r in [running, *held]:
        r.cancel()


def test_cancelled_requests_free_their_sequences_within_a_step(endless_chat_model):
    engine = make_engine(endless_chat_model, max_seqs=4)
    ids = prompts(endless_chat_model[1], 1)[0]
    requests = [engine.submit(ids, SamplingParams(temperature=0)) for _ in range(4)]  # none ends by itself
    for r in requests:
        next(iter(r))  # streaming has begun
        r.cancel()
    deadline = time.monotonic() + 30
    while not engine.idle() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.idle() and engine.running_sequences == 0
    assert engine.stats["cancelled"] == 4
    assert len(list(engine.submit(ids, SamplingParams(temperature=0, max_tokens=3)))) == 3  # still serving


def test_an_exception_fails_only_its_request(tiny_chat_model, monkeypatch):
    engine = make_engine(tiny_chat_model)
    ids = prompts(tiny_chat_model[1], 2)
    good = SamplingParams(temperature=0, max_tokens=30)
    original = Generation.step

    def broken_step(generation, index, choice, row):
        if generation.prompt_ids == ids[0] and len(choice.generated) == 3:
            raise RuntimeError("injected fault")
        return original(generation, index, choice, row)

    # In place before the request is submitted: the engine thread may reach step 3 at once.
    monkeypatch.setattr(Generation, "step", broken_step)
    doomed = engine.submit(ids[0], SamplingParams(temperature=0, max_tokens=30))
    survivor = engine.submit(ids[1], good)
    with pytest.raises(RequestFailed, match="injected fault"):
        list(doomed)
    assert len(list(survivor)) == 30
    assert engine.thread.is_alive()
    assert len(list(engine.submit(ids[1], SamplingParams(temperature=0, max_tokens=2)))) == 2
