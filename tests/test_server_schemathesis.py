"""schemathesis against the server's generated OpenAPI document: no 5xx, every response as documented.

The app runs in-process (WSGI) on the tiny random model with its context cut to 64 tokens, so
that the largest generation schemathesis can ask for (n=16, max_tokens up to the context) takes
milliseconds. Both positive (schema-valid) and negative (schema-violating) requests are sent,
100 examples per operation with a fixed seed.

The app is built when the module is imported (schemathesis reads its document to make one test
per operation) with no model yet; a fixture loads the tiny model into it before the tests run.
"""

import json

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from server_helpers import tiny_model_dir
from webapp.app import ServerConfig, create_app
from webapp.serving import ModelState
from webapp.schemas import ChatCompletionChunk, CompletionResponse



@schemathesis.check
def stream_chunks_conform(ctx, response, case):
    """Each data event of a stream is one chunk of the documented schema, and [DONE] comes last.

    (The OpenAPI document can only say that an event's data is a string: OpenAPI 3.0 cannot point
    a string at a JSON schema. So the chunks are loaded here through the response schemas, which
    refuse missing required fields, wrong types and undocumented fields.)
    """
    if "text/event-stream" not in response.headers.get("content-type", [""])[0]:
        return None
    chunk_schema = ChatCompletionChunk() if case.path.endswith("chat/completions") else CompletionResponse()
    blocks = response.content.decode("utf-8").split("\n\n")
    data = [b[len("data: "):] for b in blocks if b.startswith("data: ")]
    assert data and data[-1] == "[DONE]", "a stream must end with data: [DONE]"
    for chunk in data[:-1]:
        chunk_schema.load(json.loads(chunk))
    return True


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, stream_chunks_conform]


STATE = ModelState()
APP = create_app(STATE, ServerConfig(keep_alive_ms=10_000))
schema = schemathesis.openapi.from_wsgi("/openapi.json", APP)
schema.config.seed = 20261125
schema.config.max_stream_events = 100_000  # read every stream to its end ([DONE] is checked)


@pytest.fixture(scope="module", autouse=True)
def tiny_engine(tmp_path_factory):
    loaded = ModelState.loaded(tiny_model_dir(tmp_path_factory.mktemp("tiny64"), context=64))
    STATE.engine, STATE.model_id = loaded.engine, loaded.model_id
    yield
    STATE.engine = None


@schema.parametrize()
@hypothesis.settings(max_examples=100, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_openapi_conformance(case):
    case.call_and_validate(checks=CHECKS)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_streamed_responses_conform(path):
    """Schema-valid bodies with stream forced on (random generation rarely picks it): events, not 5xx."""
    operation = schema[path]["POST"]
    statuses = []

    @hypothesis.given(case=operation.as_strategy())
    @hypothesis.settings(max_examples=100, deadline=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))
    def run(case):
        case.body = {**case.body, "stream": True}
        statuses.append(case.call_and_validate(checks=CHECKS).status_code)

    run()
    assert statuses.count(200) >= 20, f"too few streams were accepted to test them: {statuses}"
