"""The Flask app in-process (test client) on the tiny model: what is easier to force without a process —
a model still loading, an engine that fails, the lock's order, the error paths."""

import json
import threading
import time

import pytest

from server_helpers import data_events, sse_events, tiny_model_dir
from webapp.app import ServerConfig, create_app, keep_alive_from_env
from webapp.errors import first_error
from webapp.serving import POLL_SECONDS, Job, ModelState


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return ModelState.loaded(tiny_model_dir(tmp_path_factory.mktemp("app") / "tiny"))


@pytest.fixture
def engine(state):
    return state.engine


@pytest.fixture
def client(state):
    return create_app(state, ServerConfig(keep_alive_ms=10_000)).test_client()


def error_of(response, status):
    assert response.status_code == status, response.data
    assert response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_health_is_503_until_the_model_is_loaded(engine):
    state = ModelState()
    client = create_app(state, ServerConfig(keep_alive_ms=10_000)).test_client()
    assert error_of(client.get("/health"), 503)["code"] == "model_not_ready"
    assert error_of(client.post("/v1/completions", json={"prompt": "x"}), 503)["code"] == "model_not_ready"
    assert client.get("/docs").status_code == 200 and client.get("/openapi.json").status_code == 200
    state.engine, state.model_id = engine, "tiny"
    assert client.get("/health").get_json() == {"status": "ok", "model": "tiny"}


def test_health_reports_a_failed_load():
    def fail():
        raise FileNotFoundError("no weights here")

    state = ModelState().load_in_background(fail, "tiny")
    client = create_app(state, ServerConfig(keep_alive_ms=10_000)).test_client()
    deadline = time.monotonic() + 10
    while state.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    error = error_of(client.get("/health"), 503)
    assert error["code"] == "model_load_failed" and "no weights here" in error["message"]


def test_unexpected_error_is_a_500_envelope_without_traceback(engine, monkeypatch, client):
    def broken(*args):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(engine, "submit_all", broken)
    response = client.post("/v1/chat/completions", json={"messages": "hi"})
    error = error_of(response, 500)
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert response.headers["X-Request-Id"] in error["message"]
    assert "secret internals" not in response.get_data(as_text=True)
    assert "Traceback" not in response.get_data(as_text=True)


def test_error_during_a_stream_is_one_error_event_then_done(monkeypatch, client):
    real_events = Job.events

    def failing(job, poll=POLL_SECONDS):
        for i, item in enumerate(real_events(job, poll)):
            if i == 2:
                raise RuntimeError("the engine broke")
            yield item

    monkeypatch.setattr(Job, "events", failing)
    response = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5, "stream": True})
    assert response.status_code == 200
    blocks = sse_events(response.get_data(as_text=True))
    chunks, done = data_events(blocks)
    assert blocks[-1] == "data: [DONE]" and blocks.count("data: [DONE]") == 1
    assert chunks[-1]["error"]["type"] == "server_error"  # one error event, after the chunks already sent
    assert all("error" not in chunk for chunk in chunks[:-1])
    assert "the engine broke" not in response.get_data(as_text=True)


def test_unknown_fields_are_ignored_and_variants_accepted(client):
    body = {"messages": [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                         {"role": "user", "content": "hi", "name": "ann"}],
            "max_tokens": 2, "some_future_field": {"x": 1}, "tools": [], "response_format": {"type": "text"},
            "temperature": None, "stop": None, "n": None}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.data
    assert response.get_json()["choices"][0]["message"]["role"] == "assistant"


def test_completions_default_to_16_tokens(client):
    usage = client.post("/v1/completions", json={"prompt": "hi", "logit_bias": {"2": -100}}).get_json()["usage"]
    assert usage["completion_tokens"] == 16  # OpenAI's default max_tokens for this endpoint (EOS banned)


def test_stop_token_ids(client):
    """The seed's StopTokens: token ids stop like the end-of-sequence token and are not in the text."""
    free = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8, "temperature": 0, "logprobs": 0,
                                                "logit_bias": {"2": -100}}).get_json()["choices"][0]
    tokens = free["logprobs"]["tokens"]
    token = client.application.extensions["refimpl"].state.engine.tokenizer.encode(tokens[3])
    assert len(token) == 1
    stopped = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8, "temperature": 0,
                                                   "stop": token, "logit_bias": {"2": -100}}).get_json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["text"] == "".join(tokens[:3])


def test_no_cors_headers_by_default(client):
    response = client.get("/health", headers={"Origin": "http://anywhere.example"})
    assert not any(h.lower().startswith("access-control-") for h in response.headers.keys())


def test_two_apps_side_by_side(state):
    """The factory can be called again (tests, or an app per model): blueprints and docs do not leak."""
    a = create_app(state, ServerConfig(keep_alive_ms=10_000)).test_client()
    b = create_app(state, ServerConfig(api_key="k", keep_alive_ms=10_000)).test_client()
    assert a.get("/v1/models").status_code == 200 and b.get("/v1/models").status_code == 401
    assert a.get("/openapi.json").get_json()["paths"] == b.get("/openapi.json").get_json()["paths"]


def test_openapi_document_is_generated_from_the_schemas(client):
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"] == "3.0.3"
    schemas = spec["components"]["schemas"]
    for name in ("ChatCompletionRequest", "ChatCompletionResponse", "ChatCompletionChunk", "CompletionRequest",
                 "CompletionResponse", "CompletionUsage", "ModelList", "ErrorResponse"):
        assert name in schemas, name
    assert schemas["ChatCompletionRequest"]["properties"]["temperature"]["maximum"] == 2
    assert {"string", "array"} == {alt["type"] for alt in schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]}
    assert set(schemas["ErrorDetail"]["required"]) == {"message", "type", "param", "code"}
    post = spec["paths"]["/v1/chat/completions"]["post"]
    assert set(post["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}


def test_keep_alive_interval_from_environment(monkeypatch):
    monkeypatch.setenv("KEEP_ALIVE_INTERVAL", "250")
    assert keep_alive_from_env() == 250
    monkeypatch.delenv("KEEP_ALIVE_INTERVAL")
    assert keep_alive_from_env() == 10_000
    monkeypatch.setenv("KEEP_ALIVE_INTERVAL", "soon")
    with pytest.raises(ValueError):
        keep_alive_from_env()


def test_keep_alive_while_waiting_for_the_model(state, engine, monkeypatch):
    """Keep-alives flow while a stream waits for its first step (here: an engine step that stalls)."""
    client = create_app(state, ServerConfig(keep_alive_ms=20)).test_client()
    release = threading.Event()
    real_step = engine.step

    def stalled_step():
        release.wait(timeout=60)
        real_step()

    monkeypatch.setattr(engine, "step", stalled_step)
    response = client.post("/v1/chat/completions", json={"messages": "hi", "max_tokens": 2, "stream": True})
    body = ""
    for chunk in response.iter_encoded():  # read as it is written; the step stalls until 5 keep-alives came
        body += chunk.decode()
        if body.count(": keep-alive") >= 5:
            release.set()
    blocks = sse_events(body)
    assert blocks.count(": keep-alive") >= 5
    assert data_events(blocks)[1]


@pytest.mark.parametrize("messages, expected", [
    ({"messages": {0: {"role": ["Must be one of: ..."]}}}, "messages[0].role"),
    ({"logit_bias": {"abc": {"key": ["bad key"]}}}, "logit_bias"),
    ({"_schema": ["Invalid input type."]}, None),
    ({"stop": {1: ["Shorter than minimum length 1."]}}, "stop[1]"),
    ({"stream_options": {"include_usage": ["Not a valid boolean."]}}, "stream_options.include_usage"),
])
def test_first_error_names_the_param(messages, expected):
    assert first_error(messages)[0] == expected


def test_strict_json(client):
    for raw in (b'{"messages": "x", "n": 1, "n": NaN}', b'{"messages": "\\udfff"}', b'\xef\xbb\xbf{"messages": "x"}'):
        error = error_of(client.post("/v1/chat/completions", data=raw, content_type="application/json"), 400)
        assert error["code"] == "invalid_json", (raw, error)
    ok = client.post("/v1/chat/completions", content_type="application/json; charset=utf-8",
                     data=json.dumps({"messages": "\U0001f600", "max_tokens": 1}).encode())
    assert ok.status_code == 200
