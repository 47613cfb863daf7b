"""GET /v1/models, /health, and the documentation: /docs (Swagger UI), /openapi.json, /favicon.ico.

Swagger UI's JavaScript and CSS come from the swagger-ui-bundle package and are served from
/docs/static/, so the page works on a machine without internet access (flask-smorest would
load them from a CDN by default).

Most of the OpenAPI document comes from the blueprints' decorators; register_docs adds what
they cannot say: each request schema's example (the body of Swagger UI's "Try it out"), and the
two routes outside flask-smorest, /metrics and the web chat's WebSocket /v1/ws.
"""

import json
import time
from pathlib import Path

from flask import current_app, send_from_directory
from swagger_ui_bundle import swagger_ui_path
from werkzeug.routing import Map, Rule

from webapp.common import current_model
from webapp.parsing import Blueprint
from webapp.schemas import (ChatCompletionRequest, CompletionRequest, ErrorResponse, Health, InspectRequest, Model,
                            ModelList)

blp = Blueprint("models", __name__, description="The loaded model, the server's health and its metrics.")

STARTED = int(time.time())
SWAGGER_UI_URL = "/docs/static/"
STATIC = Path(__file__).parent / "static"


def model_entry(model):
    config = model.engine.model.config
    return {"id": model.model_id, "object": "model", "created": STARTED, "owned_by": "refimpl",
            "architecture": config.model_type, "max_model_len": config.max_position_embeddings}


@blp.route("/v1/models", methods=["GET"])
@blp.response(200, ModelList)
def list_models():
    """The model this server runs (one per process)."""
    return {"object": "list", "data": [model_entry(current_model(""))]}


@blp.route("/v1/models/<path:model>", methods=["GET"])
@blp.response(200, Model)
def get_model(model):
    """One model by id (404 model_not_found for any other)."""
    return model_entry(current_model(model))


@blp.route("/health", methods=["GET"])
@blp.response(200, Health)
@blp.doc(security=[])  # public even when an API key is set (app.PUBLIC_ENDPOINTS)
def health():
    """200 once the model is loaded; 503 (with the error envelope) while it loads or if it failed."""
    return {"status": "ok", "model": current_model("").model_id}


# OpenAPI 3.0 has no WebSocket operation, but the handshake is a GET answered 101 Switching
# Protocols, which OpenAPI can state; so /v1/ws is documented as that GET, with the protocol in
# its description, where a reader of /docs looks for it (next to chat completions).
WEBSOCKET_DOC = {"get": {
    "tags": ["chat"],
    "summary": "The web chat's WebSocket: a chat reply token by token, with what the sampler saw at each token.",
    "description": """Open it with a WebSocket client (ws://HOST/v1/ws); Swagger UI's *Try it out* sends a
plain GET, which is not a handshake and is refused. Every message is a JSON text frame: an object whose
`type` says what it is. A chat goes through the chat completions path: the same request checks and
limits, the same engine, the same API key.

Client to server:

- `{"type": "auth", "api_key": "KEY"}` when hello says `auth_required` (a browser cannot set an
  Authorization header on a WebSocket; a client that can may send it with the handshake instead)
- `{"type": "chat", "id": "r1", "messages": [{"role": "user", "content": "Hi"}], "settings": {"temperature": 0.7,
  "top_p": 0.95, "top_k": 40, "min_p": 0.05, "max_tokens": 256, "seed": 1, "response_format": {"type": "json_object"}},
  "alternatives": 10}`: each setting optional (null or absent: the API's default), alternatives 10 to 20
  (optional, default 10)
- `{"type": "cancel", "id": "r1"}`: that reply ends at the next engine step (its done event says `canceled`)
- `{"type": "inspect", "id": "i1", "request": {...}}`: look inside the model; `request` is a `POST /v1/inspect`
  body, checked and limited the same way

Server to client:

- `{"type": "hello", "protocol": 1, "model": "...", "auth_required": false}` on connect
- one `{"type": "token", "id", "index", "token_id", "text", "bytes", "offset", "delta", "special", "p",
  "logprob", "rank", "alternatives": [{"token_id", "text", "bytes", "special", "p", "p_temp", "kept",
  "removed_by", "chosen"}, ...], "other_p", "other_p_temp", "top_p_cut"}` per generated token (removed_by: null,
  "grammar", "temperature", "top_k", "top_p" or "min_p"): appending the
  deltas gives the reply; p, logprob and rank are the model's raw distribution
- `{"type": "done", "id", "finish_reason": "stop" | "length" | "canceled", "content", "usage", "request_id"}`:
  request_id names the reply's line in the server's log
- `{"type": "inspection", "id", "inspection": {...}}`: the `POST /v1/inspect` response
- `{"type": "error", "id", "status", "error": {"message", "type", "param", "code"}}`: ends that reply
  (id is null if the message had none); the socket stays open

One reply streams at a time per socket: a second chat (or an inspect) meanwhile gets a 409 error event. The README's
web chat section describes every field of a token event.

Limits: a browser page from another origin than this server's (or one allowed by `--cors-origin`) is
refused at the handshake with 403; a message larger than the request body limit (`--max-body-bytes`)
closes the socket with code 1009 before it is read; the server pings every `--ws-ping-interval` seconds
and closes a socket that stops answering; a socket with no message and no reply for `--ws-idle-timeout`
seconds is closed with 1000, and every idle socket with 1001 when the server shuts down.""",
    "responses": {
        "101": {"description": "Switching Protocols: the socket is open, and the server sends hello."},
        "400": {"description": "Not a WebSocket handshake.",
                "content": {"application/json": {"schema": ErrorResponse}}},
        "403": {"description": "A browser page of another origin (cross-site WebSocket hijacking).",
                "content": {"application/json": {"schema": ErrorResponse}}},
        "default": "DEFAULT_ERROR",
    },
}}

METRICS_DOC = {"get": {
    "tags": ["models"],
    "summary": "The server's state in Prometheus' text format.",
    "description": """- `refimpl_requests_total{status}`: requests answered, by HTTP status
- `refimpl_running_sequences`: sequences in the engine's batch now
- `refimpl_waiting_requests`: requests queued for a place in the batch
- `refimpl_generated_tokens_total`: tokens sampled by the engine
- `refimpl_time_to_first_token_seconds`: histogram, from the start of streaming to the first token
- `refimpl_inter_token_latency_seconds`: histogram, between consecutive tokens of one request
- `refimpl_client_disconnects_total`: requests whose client went away before the end""",
    "responses": {
        "200": {"description": "Prometheus' text exposition format.",
                "content": {"text/plain": {"schema": {"type": "string"}}}},
        "default": "DEFAULT_ERROR",
    },
}}


def register_docs(app, api):
    """Serve Swagger UI's files locally, the OpenAPI document where mistral.rs has it too, and the icon;
    complete the document with the request examples, /metrics and /v1/ws."""
    def docs_static(filename):
        return send_from_directory(swagger_ui_path, filename)

    def openapi_alias():
        return current_app.response_class(json.dumps(api.spec.to_dict()), mimetype="application/json")

    def favicon():
        # An SVG under the name browsers ask for by default: the chat page and /docs need no <link>.
        return send_from_directory(STATIC, "favicon.svg", mimetype="image/svg+xml")

    app.add_url_rule(f"{SWAGGER_UI_URL}<path:filename>", "docs_static", docs_static)
    app.add_url_rule("/api-doc/openapi.json", "openapi_alias", openapi_alias)
    app.add_url_rule("/favicon.ico", "favicon", favicon)

    # A schema-level example is what Swagger UI fills "Try it out" with; the request schemas are
    # registered as components by now (api.register_blueprint), under their class names.
    for schema in (ChatCompletionRequest, CompletionRequest, InspectRequest):
        api.spec.components.schemas[schema.__name__]["example"] = schema.EXAMPLE
    document_route(api, "/metrics", METRICS_DOC)
    document_route(api, "/v1/ws", WEBSOCKET_DOC)


def document_route(api, path, operations):
    """Document a route that is no flask-smorest view (metrics.py's, webchat.py's): flask-smorest's
    plugin reads the path from a werkzeug Rule, bound to a map so that it knows its arguments."""
    rule = Rule(path)
    Map([rule])
    api.spec.path(rule=rule, operations=operations)
