"""Shared fixtures: the default model (fetched and converted once) and the golden data."""

import json
from pathlib import Path

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



@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory):
    """A tiny random model with a sliding window (golden/tiny/mistral-sliding-window), a byte-level
    tokenizer and a ChatML template: fast enough for tests that generate a lot, real in every other way."""
    from server_helpers import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny-chat"), source="mistral-sliding-window")
