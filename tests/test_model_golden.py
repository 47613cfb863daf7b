"""Log-probabilities, cached decoding and greedy tokens against Hugging Face transformers.

The golden files were made by golden/make_golden_logprobs.py (transformers, torch, CPU,
float32, eager attention); regenerate them with `make golden`, never by hand.
"""


import numpy as np
import pytest

from refimpl.models import forward, load_model
from refimpl.sampling import log_softmax
from refimpl.xp import to_numpy

from conftest import GOLDEN, clearly_apart, load_golden

TOLERANCE = 1e-4  # max |Δ logprob| at every position of every case
TINY = sorted(p.name for p in (GOLDEN / "tiny").iterdir() if (p / "reference.json").exists())


def assert_close(ours, theirs, what):
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    diff = np.abs(ours - theirs)
    worst = np.unravel_index(int(diff.argmax()), diff.shape) if diff.size else ()
    assert diff.max(initial=0) <= TOLERANCE, (
        f"{what}: max |Δ logprob| = {diff.max():.3g} > {TOLERANCE} at index {worst} "
        f"(ours {ours[worst]:.6f}, transformers {theirs[worst]:.6f}); "
        "if transformers' output legitimately changed, regenerate with `make golden`")


def prompt_logprobs(model, ids):
    """Log-probabilities [T, V] of the next token after each prefix of ids, in one full pass."""
    cache = model.new_cache(len(ids))
    return to_numpy(log_softmax(model.xp, forward(model, [ids], [cache], all_logits=True)))


def check_prompt(model, case):
    ids = case["input_ids"]
    lp = prompt_logprobs(model, ids)
    assert_close(lp[np.arange(len(ids) - 1), ids[1:]], case["token_logprobs"][1:], f"{case['name']} token logprobs")
    top_ids = np.asarray(case["top_ids"])
    assert_close(np.take_along_axis(lp, top_ids, axis=-1), case["top_logprobs"], f"{case['name']} top-20 logprobs")
    # The most likely token is the same wherever transformers' top two are not a near-tie.
    clear = clearly_apart(case["top_logprobs"], 2 * TOLERANCE)
    np.testing.assert_array_equal(lp.argmax(-1)[clear], top_ids[clear, 0])


def check_greedy(model, case):
    ids = case["input_ids"]
    n = len(case["greedy_ids"])
    cache = model.new_cache(len(ids) + n)
    logits = forward(model, [ids], [cache])
    tokens, logprobs = [], []
    for _ in range(n):
        lp = to_numpy(log_softmax(model.xp, logits))[0]
        tokens.append(int(lp.argmax()))
        logprobs.append(lp[tokens[-1]])
        logits = forward(model, [[tokens[-1]]], [cache])
    assert tokens == case["greedy_ids"], f"{case['name']}: greedy tokens differ at step {first_difference(tokens, case['greedy_ids'])}"
    assert_close(logprobs, case["greedy_logprobs"], f"{case['name']} greedy logprobs (cached decoding)")


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.fixture(scope="module")
def default_golden():
    return load_golden("smollm2-135m-instruct.json")


@pytest.fixture(scope="module")
def default_model(default_model_dir):
    return load_model(default_model_dir)


def test_default_golden_covers_what_the_issue_asks(default_golden):
    cases = default_golden["cases"]
    assert len(cases) >= 6
    assert {c["kind"] for c in cases} == {"raw", "chat"}
    assert max(len(c["input_ids"]) for c in cases) >= 1000
    assert all(len(c["greedy_ids"]) == 32 and len(c["top_ids"][0]) == 20 for c in cases)


@pytest.mark.parametrize("index", range(6))
def test_default_model_prompt_logprobs(default_model, default_golden, index):
    for case in default_golden["cases"][index::6]:
        check_prompt(default_model, case)


@pytest.mark.parametrize("index", range(6))
def test_default_model_greedy_with_cache(default_model, default_golden, index):
    for case in default_golden["cases"][index::6]:
        check_greedy(default_model, case)


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_matches_transformers(name):
    golden = load_golden(f"tiny/{name}/reference.json")
    model = load_model(GOLDEN / golden["model"])
    for case in golden["cases"]:
        check_prompt(model, case)
        check_greedy(model, case)


def test_every_llama_family_flag_is_covered():
    configs = {name: load_model(GOLDEN / "tiny" / name).config for name in TINY}
    flags = {name: c for name, c in configs.items() if c.model_type in ("llama", "mistral", "qwen2")}
    assert any(c.rope_scaling for c in flags.values())
    assert any(c.sliding_window for c in flags.values())
    assert any(c.qkv_bias and not c.o_bias for c in flags.values())
    assert any(not c.tie_word_embeddings and c.mlp_bias and c.o_bias for c in flags.values())


@pytest.mark.parametrize("name", TINY)
def test_cached_decoding_equals_full_pass(name):
    """Feeding the prompt in pieces through the cache gives what one full pass gives."""
    golden = load_golden(f"tiny/{name}/reference.json")
    model = load_model(GOLDEN / golden["model"])
    ids = max((c["input_ids"] for c in golden["cases"]), key=len)
    full = prompt_logprobs(model, ids)
    cache = model.new_cache(len(ids))
    pieces, start = [], 0
    for size in [5, 1, 1, 7, 1, 13] + [1] * len(ids):
        if start >= len(ids):
            break
        chunk = ids[start:start + size]
        pieces.append(to_numpy(log_softmax(model.xp, forward(model, [chunk], [cache], all_logits=True))))
        start += len(chunk)
    # Not bit-identical: BLAS sums in a different order for a 1-row and a 13-row product, which
    # moves float32 results by ~1e-5. A caching bug (wrong position, stale key) moves them by ~1.
    assert_close(np.concatenate(pieces), full, "cached pieces vs one full pass")


def test_batched_forward_equals_one_at_a_time():
    """Sequences of different lengths in one call give what each gives alone."""
    golden = load_golden("tiny/mistral-sliding-window/reference.json")
    model = load_model(GOLDEN / golden["model"])
    prompts = [c["input_ids"] for c in golden["cases"]]
    alone = [prompt_logprobs(model, ids)[-1] for ids in prompts]
    caches = [model.new_cache(len(ids)) for ids in prompts]
    together = to_numpy(log_softmax(model.xp, forward(model, prompts, caches)))
    assert_close(together, np.stack(alone), "batched vs one at a time")


def test_generate_command_prints_the_greedy_continuation(default_golden, default_model_dir, capsys):
    from refimpl.cli import main
    from refimpl.tokenizer import Tokenizer

    case = next(c for c in default_golden["cases"] if c["kind"] == "raw" and len(c["input_ids"]) < 200)
    tokenizer = Tokenizer.from_dir(default_model_dir)
    expected = case["greedy_ids"]
    if tokenizer.eos_token_id in expected:
        expected = expected[:expected.index(tokenizer.eos_token_id)]
    assert main(["generate", case["text"], "--max-tokens", str(len(case["greedy_ids"])), "--model", str(default_model_dir)]) == 0
    assert capsys.readouterr().out == tokenizer.decode(expected) + "\n"


@pytest.mark.parametrize("name", TINY)
def test_batched_decoding_equals_one_at_a_time(name):
    """Several sequences decoding one token each (each row multiplied alone, each query over its own
    keys) match each sequence scored whole by the prompt path, through the sliding window too: the
    prompts are longer than Mistral's window of 16."""
    golden = load_golden(f"tiny/{name}/reference.json")
    model = load_model(GOLDEN / golden["model"])
    prompts = [c["input_ids"] for c in golden["cases"]]
    steps = [c["greedy_ids"][:3] for c in golden["cases"]]
    caches = [model.new_cache(len(ids) + 3, len(ids)) for ids in prompts]
    forward(model, prompts, caches)
    together = [to_numpy(log_softmax(model.xp, forward(model, [[s[i]] for s in steps], caches))) for i in range(3)]
    for b, (ids, tokens) in enumerate(zip(prompts, steps)):
        alone = prompt_logprobs(model, ids + tokens)[-3:]
        assert_close(np.stack([t[b] for t in together]), alone, f"{name} sequence {b}: batched vs alone")
