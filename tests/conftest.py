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


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory):
    """A tiny random model (golden/tiny/mistral-sliding-window) with a byte-level tokenizer and a
    ChatML template: fast enough for tests that generate a lot, real in every other way."""
    import shutil

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from refimpl.tokenizer import byte_alphabet

    path = tmp_path_factory.mktemp("tiny-chat")
    shutil.copy(GOLDEN / "tiny" / "mistral-sliding-window" / "model.safetensors", path)
    config = json.loads((GOLDEN / "tiny" / "mistral-sliding-window" / "config.json").read_text())
    tokenizer = Tokenizer(models.BPE(vocab={c: b for b, c in byte_alphabet().items()}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])  # ids 256 and 257
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML}))
    (path / "config.json").write_text(json.dumps(config | {"bos_token_id": 256, "eos_token_id": 257}))
    return path
