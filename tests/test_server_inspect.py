"""POST /v1/inspect (webapp/inspection.py): the reference forward pass's insides over HTTP.

What a user relies on: the response is refimpl.inspection's numbers for the prompt as the model
reads it (text, token ids, or messages through the chat template), narrowed by `positions`;
requests past the limits get a 400 that says how to narrow them; a second inspection while one
runs gets 429 with Retry-After; the API key guards it like every other route. On the real server
(gunicorn, default model) an inspection runs beside a streaming reply without stalling it or
/health, and its log-probabilities are the ones completions' echo reports.
"""

import threading
import time

import pytest
import requests

from refimpl import inspection
from server_helpers import LiveServer
from webapp import inspection as web_inspection
from webapp.app import ServerConfig, create_app
from webapp.schemas import InspectResponse
from webapp.serving import ModelState

MESSAGES = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris is the capital."}]


@pytest.fixture(scope="module")
def state(tiny_chat_model_dir):
    return ModelState.loaded(tiny_chat_model_dir)


@pytest.fixture(scope="module")
def client(state):
    return create_app(state, ServerConfig(keep_alive_ms=10_000)).test_client()


def inspect(client, body, status=200, **headers):
    response = client.post("/v1/inspect", json=body, headers=headers)
    assert response.status_code == status, response.data
    return response.get_json()


def test_messages_are_rendered_and_every_number_is_the_reference_pass(client, state):
    reply = inspect(client, {"messages": MESSAGES, "logit_lens": {"top": 4},
                             "attention": {"layers": "all", "heads": [0, 3]}})
    InspectResponse().load(reply)  # every field documented, none missing
    engine = state.engine
    ids = engine.tokenizer.encode_chat(MESSAGES, add_generation_prompt=False)
    assert reply["token_ids"] == ids and reply["text"] == engine.tokenizer.decode(ids)
    assert "".join(reply["tokens"]) == reply["text"]  # byte-level pieces of ASCII text, markers as themselves

    config = engine.model.config
    asked = inspection.request(config, len(ids), top=4, layers="all", heads=[0, 3])
    ours = inspection.inspect(engine.model, ids, asked)
    assert reply["logprobs"] == ours.logprobs and reply["logprobs"][0] is None
    assert len(reply["logit_lens"]) == len(ids)
    for t, layers in enumerate(reply["logit_lens"]):
        assert [entry["layer"] for entry in layers] == list(range(config.num_hidden_layers + 1))
        for entry, row in zip(layers, ours.lens[t]):
            assert [(c["token_id"], c["logprob"]) for c in entry["top"]] == row.top
            assert entry["entropy"] == row.entropy
            if t + 1 < len(ids):
                assert entry["next_token"] == {"token_id": ids[t + 1], "token": reply["tokens"][t + 1],
                                               "logprob": row.next_logprob, "rank": row.next_rank}
            else:
                assert entry["next_token"] is None
        assert layers[-1]["next_token"] is None or layers[-1]["next_token"]["logprob"] == reply["logprobs"][t + 1]

    assert [(a["layer"], a["head"]) for a in reply["attention"]] == \
        [(layer, head) for layer in range(config.num_hidden_layers) for head in (0, 3)]
    for a in reply["attention"]:
        rows = ours.attention[(a["layer"], a["head"])]
        for p, (row, exact) in enumerate(zip(a["weights"], rows)):
            assert len(row) == p + 1 and abs(sum(row) - 1) < 1e-4
            assert max(abs(w - float(x)) for w, x in zip(row, exact)) <= 5.001e-7  # rounded to 6 decimals

    # Each message's turn, in order, covering the prompt; its text inside its span.
    spans = reply["message_tokens"]
    assert spans[0][0] == 0 and spans[-1][1] == len(ids)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    for message, (start, end) in zip(MESSAGES, spans):
        assert message["content"] in "".join(reply["tokens"][start:end])


def test_text_ids_and_the_generation_prompt(client, state):
    tokenizer = state.engine.tokenizer
    by_text = inspect(client, {"prompt": "The capital of France is"})
    by_ids = inspect(client, {"prompt": tokenizer.encode("The capital of France is")})
    assert by_text == by_ids and by_text["message_tokens"] is None
    assert by_text["logit_lens"] is None and by_text["attention"] is None
    assert by_text["positions"] == list(range(len(by_text["token_ids"])))

    plain = inspect(client, {"messages": MESSAGES[:1]})
    ready = inspect(client, {"messages": MESSAGES[:1], "add_generation_prompt": True})
    assert ready["token_ids"] == tokenizer.encode_chat(MESSAGES[:1])  # what a chat reply's prompt is
    assert ready["token_ids"][:len(plain["token_ids"])] == plain["token_ids"]
    assert len(ready["token_ids"]) > len(plain["token_ids"])
    assert inspect(client, {"messages": "What is the capital of France?"})["token_ids"] == plain["token_ids"]


def test_positions_narrow_the_lens_and_the_attention_rows(client):
    body = {"prompt": "one two three four five six", "logit_lens": {"top": 3},
            "attention": {"layers": [0], "heads": "all"}}
    full = inspect(client, body)
    some = inspect(client, body | {"positions": [7, 2, 7]})
    assert some["positions"] == [2, 7]
    for narrowed, p in zip(some["logit_lens"], [2, 7]):  # the rows of a product of another shape: float32 rounding
        for a, b in zip(narrowed, full["logit_lens"][p]):
            assert [c["logprob"] for c in a["top"]] == pytest.approx([c["logprob"] for c in b["top"]], abs=1e-5)
            assert a["next_token"]["logprob"] == pytest.approx(b["next_token"]["logprob"], abs=1e-5)
    for a, b in zip(some["attention"], full["attention"]):
        assert a["weights"] == [b["weights"][2], b["weights"][7]]
    assert some["logprobs"] == full["logprobs"]


@pytest.mark.parametrize("body, param, code, words", [
    ({"prompt": "hi", "messages": "hi"}, "prompt", "invalid_value", "either prompt or messages"),
    ({}, "prompt", "invalid_value", "either prompt or messages"),
    ({"prompt": "hi", "add_generation_prompt": True}, "add_generation_prompt", "invalid_value", "needs messages"),
    ({"prompt": [1, 2, 10**6]}, "prompt", "invalid_value", "not in this model's vocabulary"),
    ({"prompt": "hi", "positions": [40]}, "positions", "invalid_value", "not in the prompt"),
    ({"prompt": "hi", "logit_lens": {"top": 21}}, "logit_lens.top", "invalid_value", "20"),
    ({"prompt": "hi", "attention": {"layers": [99], "heads": "all"}}, "attention.layers", "invalid_value",
     "numbered 0 to"),
    ({"prompt": "hi", "attention": {"layers": "all", "heads": [-1]}}, "attention.heads[0]", "invalid_value", "0"),
    ({"prompt": "hi", "attention": {"layers": "every", "heads": "all"}}, "attention.layers", "invalid_value", "all"),
    ({"prompt": "hi", "attention": {"layers": "all"}}, "attention.heads", "invalid_value", "required"),
    ({"prompt": "x" * 1100}, "prompt", "inspection_too_large", "at most 1024: inspect a shorter prompt"),
    ({"prompt": "x" * 900, "attention": {"layers": "all", "heads": "all"}}, "attention", "inspection_too_large",
     "ask for fewer layers or heads, fewer positions"),
])
def test_refused_with_the_way_to_narrow(client, body, param, code, words):
    error = inspect(client, body, 400)["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert words in error["message"]
    inspect(client, {"prompt": "still serving"})


def test_a_second_inspection_meanwhile_gets_429(client):
    assert web_inspection.running.acquire(blocking=False)  # as if one were running
    try:
        response = client.post("/v1/inspect", json={"prompt": "hi"})
        assert response.status_code == 429 and response.headers["Retry-After"] == "1"
        assert response.get_json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        web_inspection.running.release()
    inspect(client, {"prompt": "hi"})


def test_needs_the_api_key(state):
    client = create_app(state, ServerConfig(api_key="sk-inspect", keep_alive_ms=10_000)).test_client()
    assert inspect(client, {"prompt": "hi"}, 401)["error"]["code"] == "invalid_api_key"
    inspect(client, {"prompt": "hi"}, Authorization="Bearer sk-inspect")


def test_live_inspection_beside_a_streaming_reply(default_model_dir, tmp_path):
    """gunicorn on the default model: a 250-token inspection with the lens and every head of a layer
    runs in the engine's thread pool, so a reply streams on and /health answers meanwhile; its
    log-probabilities are those completions' echo reports for the same ids."""
    server = LiveServer(default_model_dir, log_path=tmp_path / "server.log")
    try:
        base = server.base
        ids = requests.post(f"{base}/v1/inspect", json={"prompt": "The capital of France is"},
                            timeout=60).json()["token_ids"]
        long_ids = (ids * 50)[:250]
        tokens_meanwhile, health, result = [], [], {}

        def stream():
            with requests.post(f"{base}/v1/chat/completions", stream=True, timeout=120,
                               json={"messages": [{"role": "user", "content": "Count to fifty."}],
                                     "max_tokens": 400, "temperature": 0, "stream": True,
                                     "logit_bias": {"0": -100, "1": -100, "2": -100}}) as response:
                for line in response.iter_lines():
                    if line.startswith(b"data: {"):
                        tokens_meanwhile.append(time.monotonic())
                    if "end" in result:  # the inspection is over: leave (the server cancels the reply)
                        return

        # No end-of-text token (ids 0-2 are SmolLM2's specials): the reply streams 400 tokens, well past the inspection.
        streamer = threading.Thread(target=stream)
        streamer.start()
        while not tokens_meanwhile:
            time.sleep(0.05)

        def run_inspection():
            result["reply"] = requests.post(f"{base}/v1/inspect", timeout=120, json={
                "prompt": long_ids, "logit_lens": {"top": 5}, "attention": {"layers": [3], "heads": "all"}})
            result["end"] = time.monotonic()

        inspector = threading.Thread(target=run_inspection)
        started = time.monotonic()
        inspector.start()
        while inspector.is_alive():
            health.append(requests.get(f"{base}/health", timeout=30).status_code)
            time.sleep(0.2)
        streamer.join()
        reply = result["reply"]
        assert reply.status_code == 200, reply.text
        assert len(reply.json()["logit_lens"]) == 250 and len(reply.json()["attention"]) == 9
        during = [t for t in tokens_meanwhile if started < t < result["end"]]
        assert during, "no token streamed while the inspection ran"
        assert health and set(health) == {200}

        echo = requests.post(f"{base}/v1/completions", timeout=60, json={
            "prompt": long_ids, "max_tokens": 1, "echo": True, "logprobs": 0}).json()
        echoed = echo["choices"][0]["logprobs"]["token_logprobs"][:250]
        inspected = reply.json()["logprobs"]
        assert echoed[0] is None and inspected[0] is None
        assert max(abs(a - b) for a, b in zip(echoed[1:], inspected[1:])) <= 1e-5
    finally:
        server.stop()
