"""Every family's tiny model works through the commands and the server, not only the forward pass:
`refimpl generate`, `score` and `chat` on its directory, and a chat completion whose /v1/models entry names
the family. (Each golden/tiny model gets the byte-level tokenizer of server_helpers.tiny_model_dir.)"""

import json

import pytest

from conftest import GOLDEN
from refimpl.cli import main
from refimpl.models import load_config
from refimpl.tokenizer import Tokenizer
from server_helpers import tiny_model_dir
from webapp.app import ServerConfig, create_app
from webapp.serving import ModelState

# A byte-level tokenizer needs 3 special tokens and 256 byte symbols: a tiny model with a smaller
# vocabulary (llama-rope-scaling has 256) cannot have one; its family is served by the others.
TINY = sorted(p.name for p in (GOLDEN / "tiny").iterdir() if (p / "reference.json").exists()
              and json.loads((p / "config.json").read_text())["vocab_size"] >= 259)


@pytest.fixture(scope="module", params=TINY)
def model_dir(request, tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp(request.param), source=request.param)


def test_generate_and_score(model_dir, capsys):
    assert main(["generate", "hello there", "--max-tokens", "5", "--model", str(model_dir)]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert main(["score", "hello there", "--top", "2", "--model", str(model_dir)]) == 0
    assert "total log-probability" in capsys.readouterr().out


def test_served_with_its_architecture(model_dir):
    client = create_app(ModelState.loaded(model_dir), ServerConfig(keep_alive_ms=10_000)).test_client()
    entry = client.get("/v1/models").get_json()["data"][0]
    assert entry["architecture"] == json.loads((model_dir / "config.json").read_text())["model_type"]
    reply = client.post("/v1/chat/completions", json={"messages": "hi", "max_tokens": 4, "temperature": 0,
                                                      "logprobs": True, "top_logprobs": 2})
    assert reply.status_code == 200, reply.get_json()
    assert reply.get_json()["usage"]["completion_tokens"] >= 1


def test_chat(model_dir, monkeypatch, capsys):
    said = iter(["hello", "/new", "again"])

    def typed(prompt):
        try:
            return next(said)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", typed)
    assert main(["chat", "--max-tokens", "4", "--model", str(model_dir)]) == 0
    assert capsys.readouterr().out.count("model> ") == 2  # a reply to each message, none to /new


def test_tokenize_and_inspect(model_dir, capsys):
    """`refimpl inspect` runs every family's probe: a lens row per layer 0..L and a head's weights."""
    layers = load_config(model_dir).num_hidden_layers  # GPT-2's config.json calls it n_layer
    last = len(Tokenizer.from_dir(model_dir).encode("hello there")) - 1
    assert main(["tokenize", "hello there", "--model", str(model_dir)]) == 0
    assert f"{last + 1} tokens, 11 bytes of text" in capsys.readouterr().out
    assert main(["inspect", "hello there", "--lens", "--attention", "0:0", "--model", str(model_dir)]) == 0
    out = capsys.readouterr().out
    lens = out.split(f"logit lens at position {last}")[1].split("attention of layer 0")[0]
    assert [line.split()[0] for line in lens.strip().splitlines()[2:]] == [str(i) for i in range(layers + 1)]
    assert f"attention of layer 0, head 0, at position {last}" in out
