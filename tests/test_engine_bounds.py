"""The engine's bounds and its prompt scoring: max_seqs is a hard cap, a request that can never run
is refused as such (not as "busy"), and echo's prompt log-probabilities come from chunked prefill
inside the engine, equal to the single-sequence scorer's."""

import numpy as np
import pytest

from refimpl.engine import Engine, EngineFull, NeverFits
from refimpl.generate import prompt_logprobs
from refimpl.sampling import SamplingParams


def chat_ids(tokenizer, text):
    return tokenizer.encode_chat([{"role": "user", "content": text}])


def test_max_seqs_is_a_hard_cap(tiny_chat_model):
    """However requests and their n choices arrive, no step runs more than max_seqs sequences."""
    engine = Engine(*tiny_chat_model, max_seqs=3, max_queue=16)
    most, step = 0, engine.step

    def counting_step():
        nonlocal most
        most = max(most, engine.running_sequences)
        step()

    engine.step = counting_step
    tokenizer = tiny_chat_model[1]
    requests = [engine.submit(chat_ids(tokenizer, f"question {i}"), SamplingParams(temperature=1, seed=i, n=n,
                                                                                   max_tokens=6))
                for i, n in enumerate([3, 2, 1, 3, 2])]
    for request in requests:
        list(request)
    assert most == 3


def test_a_request_that_can_never_run_is_refused_as_such(tiny_chat_model):
    engine = Engine(*tiny_chat_model, max_seqs=2, max_queue=2)
    ids = chat_ids(tiny_chat_model[1], "hi")
    with pytest.raises(NeverFits, match="max_seqs") as too_many_choices:
        engine.submit(ids, SamplingParams(n=3))
    assert too_many_choices.value.param == "n"
    with pytest.raises(NeverFits, match="max_queue") as too_many_prompts:
        engine.submit_all([ids] * 3, SamplingParams())
    assert too_many_prompts.value.param == "prompt"
    assert engine.idle()  # nothing of either was queued


def test_several_prompts_are_queued_all_or_none(endless_chat_model):
    engine = Engine(*endless_chat_model, max_seqs=1, max_queue=3)
    ids = chat_ids(endless_chat_model[1], "hi")
    running = engine.submit(ids, SamplingParams(temperature=0))
    next(iter(running))  # the one slot is taken
    waiting = engine.submit(ids, SamplingParams(temperature=0))
    with pytest.raises(EngineFull):
        engine.submit_all([ids, ids, ids], SamplingParams(temperature=0))  # 1 + 3 > 3: none of them
    assert engine.waiting_requests == 1
    both = engine.submit_all([ids, ids], SamplingParams(temperature=0))  # 1 + 2 fits
    assert engine.waiting_requests == 3
    for request in [running, waiting, *both]:
        request.cancel()


@pytest.mark.parametrize("chunk", [64, 256])
def test_scoring_in_the_engine_equals_the_single_sequence_scorer(tiny_chat_model, chunk):
    """A prompt longer than several prefill chunks, scored beside another request's decoding."""
    model, tokenizer, stop_ids = tiny_chat_model
    engine = Engine(model, tokenizer, stop_ids, prefill_chunk=chunk)
    ids = tokenizer.encode("the quick brown fox jumps over the lazy dog " * 8)[:300]
    companion = engine.submit(chat_ids(tokenizer, "keep talking"), SamplingParams(temperature=0, max_tokens=40))
    scored = engine.submit(ids, SamplingParams(temperature=0, max_tokens=2), score_top=3)
    list(scored), list(companion)
    ours, reference = scored.prompt_logprobs, prompt_logprobs(model, tokenizer, ids, top=3)
    assert len(ours) == len(ids) and ours[0] is None
    assert [e.token_id for e in ours[1:]] == ids[1:]
    # Other chunk boundaries and batch shapes than the reference's: the same model within the
    # tolerance the golden tests hold two code paths to (test_model_golden's 1e-4).
    np.testing.assert_allclose([e.logprob for e in ours[1:]], [e.logprob for e in reference[1:]], atol=1e-4)
    np.testing.assert_allclose([[t.logprob for t in e.top] for e in ours[1:]],
                               [[t.logprob for t in e.top] for e in reference[1:]], atol=1e-4)


def test_scoring_never_reads_a_prefix_cache_hit(tiny_chat_model):
    """A scored prompt needs every position's distribution, so a cached prefix is recomputed."""
    model, tokenizer, stop_ids = tiny_chat_model
    engine = Engine(model, tokenizer, stop_ids)
    ids = chat_ids(tokenizer, "the same prompt twice")
    list(engine.submit(ids, SamplingParams(temperature=0, max_tokens=1)))
    scored = engine.submit(ids, SamplingParams(temperature=0, max_tokens=1), score_top=0)
    list(scored)
    assert engine.stats["prefix_hits"] == 0 and len(scored.prompt_logprobs) == len(ids)


def test_the_prefix_cache_never_shares_keys_rotated_another_way(tmp_path):
    """Phi-3's LongRoPE rotates a sequence with its long factors when its cache may grow past
    original_max_position_embeddings (40 here): a prompt kept from a short request must not be
    reused by a long one, whose keys are rotated differently."""
    from refimpl.generate import generate, load
    from server_helpers import tiny_model_dir

    model, tokenizer, _ = load(tiny_model_dir(tmp_path, source="phi3-longrope-tiny"))
    engine = Engine(model, tokenizer, stop_ids=[])
    ids = list(range(3, 33))  # 30 tokens
    short = SamplingParams(temperature=0, max_tokens=5, logprobs=True)  # capacity 35: short factors
    long = SamplingParams(temperature=0, max_tokens=20, logprobs=True)  # capacity 50: long factors
    list(engine.submit(ids, short))
    events = list(engine.submit(ids, long))
    assert engine.stats["prefix_hits"] == 0
    alone = list(generate(model, tokenizer, ids, long, stop_ids=[]))
    np.testing.assert_allclose([e.logprobs.logprob for e in events], [e.logprobs.logprob for e in alone], atol=1e-4)
    list(engine.submit(ids, long))  # a long request after it may share the long one's prefix
    assert engine.stats["prefix_hits"] == 1
