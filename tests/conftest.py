"""Shared fixtures and helpers: the default model (fetched and converted once), tiny chat models,
the golden data, and the near-tie filter for comparing greedy tokens of two code paths."""

import json
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


@pytest.fixture(scope="session")
def default_model_dir():
    """The HF-layout directory of SmolLM2-135M-Instruct, pulled into the cache on first use."""
    from refimpl.pull import pull

    return pull()


def load_golden(name):
    """Read a generated golden file; say how to regenerate it when it is missing."""
    path = GOLDEN / name
    if not path.exists():
        pytest.fail(f"golden file {path} is missing: run `make golden` to regenerate it")
    return json.loads(path.read_text())


# Two code paths to the same logits (batch shapes, a cached prompt prefix, another CPU's BLAS
# kernels) move log-probabilities by up to ~1e-5 (test_model_golden's TOLERANCE is 1e-4), so where
# the two most likely tokens are closer than twice that, either path may pick either token.
NEAR_TIE = 2e-4


def clearly_apart(top_logprobs, margin=NEAR_TIE):
    """Per position: whether its two most likely tokens (the first two log-probabilities of
    each row, descending) are more than `margin` apart."""
    top = np.asarray(top_logprobs, dtype=np.float64)
    return top[..., 0] - top[..., 1] > margin


def steps_before_a_near_tie(top_logprobs):
    """How many leading steps of a greedy run are clearly apart: another code path must choose the
    same tokens there; from the first near-tie on, the two continuations may part."""
    clear = clearly_apart(top_logprobs)
    return len(clear) if clear.all() else int(np.argmin(clear))


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory):
    """A tiny random model with a sliding window (golden/tiny/mistral-sliding-window), a byte-level
    tokenizer and a ChatML template: fast enough for tests that generate a lot, real in every other way."""
    from server_helpers import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny-chat"), source="mistral-sliding-window")


# A reply on this model cannot end by itself while a test runs: with no end-of-sequence token it
# ends only at the context's end, and ENDLESS_CONTEXT positions take the tiny model many minutes.
ENDLESS_CONTEXT = 1 << 20


@pytest.fixture(scope="session")
def endless_chat_model_dir(tmp_path_factory):
    """tiny_chat_model_dir's model with a context of ENDLESS_CONTEXT and no end-of-sequence token, for
    tests that cancel a reply, or need one running, without racing it to its end."""
    from server_helpers import tiny_model_dir

    path = tiny_model_dir(tmp_path_factory.mktemp("endless-chat"), ENDLESS_CONTEXT, source="mistral-sliding-window")
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        config = json.loads((path / name).read_text())
        config.pop("eos_token_id", None)
        config.pop("eos_token", None)
        (path / name).write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="session")
def tiny_chat_model(tiny_chat_model_dir):
    """(model, tokenizer, stop ids) of tiny_chat_model_dir, loaded once."""
    from refimpl.generate import load

    return load(tiny_chat_model_dir)


@pytest.fixture(scope="session")
def endless_chat_model(endless_chat_model_dir):
    """(model, tokenizer, stop ids) of endless_chat_model_dir: a request without max_tokens runs until canceled."""
    from refimpl.generate import load

    return load(endless_chat_model_dir)
