"""`refimpl serve` options on the real process (tiny model): --api-key, --cors-origin, --dev, the log
line per request, and `make serve`'s PORT and HOST."""

import os
import shutil
import subprocess

import openai
import pytest
import requests

from server_helpers import ROOT, LiveServer, data_events, sse_events, tiny_model_dir

KEY = "sk-test-0123456789abcdef"
ORIGIN = "http://allowed.example"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("options") / "tiny")


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    live = LiveServer(tiny, "--api-key", KEY, "--cors-origin", ORIGIN,
                      log_path=tmp_path_factory.mktemp("options-log") / "server.log")
    yield live
    live.stop()


def auth(key):
    return {"Authorization": f"Bearer {key}"}


CHAT_BODY = {"messages": "hi", "max_tokens": 2}
NO_EOS = {"2": -100}  # sampled without a seed, a reply could end early at <|im_end|> (id 2)


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/models"), ("GET", "/v1/models/tiny"), ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"), ("GET", "/v1/nothing"),
])
@pytest.mark.parametrize("headers", [{}, auth("wrong"), auth(KEY + "x"), {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}], ids=["none", "wrong", "longer", "no-scheme",
                                                                              "basic"])
def test_api_key_required(server, method, path, headers):
    response = requests.request(method, server.base + path, json={"prompt": "x", "messages": "x"}, headers=headers,
                                timeout=30)
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key" and set(error) == {"message", "type", "param", "code"}
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_api_key_accepted(server):
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0)
    assert client.chat.completions.create(model="", messages="hi", max_tokens=2).choices
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.base}/v1", api_key="EMPTY", max_retries=0).models.list()
    stream = requests.post(f"{server.base}/v1/chat/completions", json={**CHAT_BODY, "stream": True},
                           headers=auth(KEY), timeout=30)
    assert data_events(sse_events(stream))[1]


@pytest.mark.parametrize("path", ["/health", "/docs", "/openapi.json", "/api-doc/openapi.json",
                                  "/docs/static/swagger-ui-bundle.js"])
def test_health_and_docs_need_no_key(server, path):
    assert requests.get(server.base + path, timeout=30).status_code == 200


def test_openapi_documents_bearer_auth(server):
    spec = requests.get(f"{server.base}/openapi.json", timeout=30).json()
    assert spec["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}


def test_cors_only_for_named_origins(server, tiny, tmp_path):
    allowed = requests.get(f"{server.base}/health", headers={"Origin": ORIGIN}, timeout=30)
    assert allowed.headers["Access-Control-Allow-Origin"] == ORIGIN
    other = requests.get(f"{server.base}/health", headers={"Origin": "http://evil.example"}, timeout=30)
    assert not any(h.lower().startswith("access-control-") for h in other.headers)
    preflight = requests.options(f"{server.base}/v1/chat/completions", timeout=30, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]


def test_log_line_per_request_never_the_key(server):
    ok = requests.post(f"{server.base}/v1/completions", json={"prompt": "hi", "max_tokens": 3, "logit_bias": NO_EOS},
                       headers=auth(KEY), timeout=30)
    bad = requests.get(f"{server.base}/v1/models", headers=auth(KEY + "-wrong"), timeout=30)
    log = server.log()
    ok_line = next(line for line in log.splitlines() if ok.headers["X-Request-Id"] in line)
    assert "POST /v1/completions 200 prompt=1 completion=3" in ok_line
    assert f"{bad.headers['X-Request-Id']} GET /v1/models 401" in log
    assert KEY not in log and "Authorization" not in log


def test_dev_server_streams(tiny, tmp_path):
    """--dev: Flask's development server, the same app (no CORS headers without --cors-origin)."""
    live = LiveServer(tiny, "--dev", log_path=tmp_path / "dev.log")
    try:
        response = requests.post(f"{live.base}/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True,
                                                                      "logit_bias": NO_EOS},
                                 headers={"Origin": ORIGIN}, timeout=30)
        chunks, done = data_events(sse_events(response))
        assert done and chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert "Access-Control-Allow-Origin" not in response.headers
        assert requests.get(f"{live.base}/v1/models", timeout=30).status_code == 200  # no key: open
    finally:
        live.stop()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("args, env, expected", [
    ([], {}, "--host 127.0.0.1 --port 8080"),
    (["PORT=8081"], {}, "--host 127.0.0.1 --port 8081"),
    ([], {"PORT": "8082", "HOST": "0.0.0.0"}, "--host 0.0.0.0 --port 8082"),
])
def test_make_serve_port_and_host(args, env, expected):
    environ = {k: v for k, v in os.environ.items() if k not in ("PORT", "HOST")}
    out = subprocess.run(["make", "-n", "serve", *args], cwd=ROOT, env={**environ, **env}, capture_output=True,
                         text=True, check=True).stdout
    assert "refimpl serve" in out and expected in out, out
