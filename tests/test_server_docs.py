"""The documentation as a user meets it at /docs: the OpenAPI document speaks of what this server
does, its "Try it out" bodies are small real requests that succeed, every route a user can call is
in it, and the pages have an icon (also when an API key is set)."""

import re
import xml.etree.ElementTree as ET

import pytest

from server_helpers import tiny_model_dir
from webapp import webchat
from webapp.app import ServerConfig, create_app
from webapp.schemas import ChatCompletionResponse, CompletionResponse, InspectResponse
from webapp.serving import ModelState

# Each POST operation and the schema its answer must load through (undocumented fields refused).
POST_OPERATIONS = {"/v1/chat/completions": ChatCompletionResponse, "/v1/completions": CompletionResponse,
                   "/v1/inspect": InspectResponse}


API_KEY = "sk-docs"
AUTHORIZED = {"Authorization": f"Bearer {API_KEY}"}  # what Swagger UI's Authorize button adds (ignored without a key)


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return ModelState.loaded(tiny_model_dir(tmp_path_factory.mktemp("docs") / "tiny"))


def app_client(state, api_key=None):
    return create_app(state, ServerConfig(api_key=api_key, keep_alive_ms=10_000)).test_client()


@pytest.fixture(params=[None, API_KEY], ids=["open", "api-key"])
def client(request, state):
    return app_client(state, request.param)


@pytest.fixture
def document(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.get_json()


def texts(value):
    """Every description and summary in the document, however deep."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("description", "summary") and isinstance(item, str):
                yield item
            else:
                yield from texts(item)
    elif isinstance(value, list):
        for item in value:
            yield from texts(item)


def request_example(document, path):
    """The body Swagger UI's Try it out starts from: the media type's example, else its schema's."""
    media = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    if "example" in media:
        return media["example"]
    schema = media["schema"]
    if "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    assert "example" in schema, f"POST {path}: no example, so Swagger UI would build a body of nulls"
    return schema["example"]


def test_no_description_speaks_of_the_seed(document):
    """"The seed" was an internal name for the mistral.rs API document; users read what the server does."""
    found = list(texts(document))
    assert document["info"]["description"] in found and len(found) > 30
    internal = [t for t in found if re.search(r"\bthe seed\b|\bseed's\b", t, re.IGNORECASE)]
    assert not internal


def test_every_post_operation_is_tried(document):
    """The example test below covers each POST operation of the document."""
    assert {path for path, item in document["paths"].items() if "post" in item} == set(POST_OPERATIONS)


@pytest.mark.parametrize("path", POST_OPERATIONS)
def test_try_it_out_example_is_small_real_and_answered(client, document, path):
    body = request_example(document, path)
    assert None not in body.values()
    text = body["prompt"] if "prompt" in body else body["messages"][-1]["content"]
    assert isinstance(text, str) and len(text.split()) >= 4  # words, not "string"
    response = client.post(path, json=body, headers=AUTHORIZED)
    assert response.status_code == 200, response.data
    reply = POST_OPERATIONS[path]().load(response.get_json())
    if path == "/v1/inspect":  # the prompt's tokens, looked inside: the lens and one layer's heads
        assert len(reply["token_ids"]) == len(reply["logit_lens"]) == reply["usage"]["prompt_tokens"] > 10
        assert reply["attention"] and all(len(head["weights"]) == len(reply["token_ids"]) for head in reply["attention"])
        return
    assert 1 <= body["max_tokens"] <= 64  # not a generation to the end of the context window
    assert len(reply["choices"]) == 1
    assert 1 <= reply["usage"]["completion_tokens"] <= body["max_tokens"]


def test_metrics_is_documented_as_it_answers(client, document):
    operation = document["paths"]["/metrics"]["get"]
    assert list(operation["responses"]["200"]["content"]) == ["text/plain"]
    response = client.get("/metrics", headers=AUTHORIZED)
    assert response.status_code == 200 and response.mimetype == "text/plain"
    for name in re.findall(r"^# TYPE (refimpl_\w+) ", response.get_data(as_text=True), re.MULTILINE):
        if not name.endswith("_created"):  # prometheus_client's creation time of each counter
            assert name.removesuffix("_total") in operation["description"], f"{name} is served but not described"


def test_websocket_is_documented_with_its_protocol(client, document):
    operation = document["paths"]["/v1/ws"]["get"]
    assert "101" in operation["responses"]
    for kind in [*webchat.MESSAGES, "hello", "token", "done", "error"]:  # client's messages, then the server's
        assert f'"type": "{kind}"' in operation["description"], f"the {kind} message is not described"
    plain = client.get("/v1/ws", headers=AUTHORIZED)  # what Try it out sends: not a handshake, answered as documented
    assert str(plain.status_code) in operation["responses"] and plain.mimetype == "application/json"


@pytest.mark.parametrize("api_key", [None, API_KEY])
def test_favicon_is_served_without_a_key(state, api_key):
    response = app_client(state, api_key).get("/favicon.ico")
    assert response.status_code == 200 and response.mimetype == "image/svg+xml"
    assert ET.fromstring(response.data).tag == "{http://www.w3.org/2000/svg}svg"
