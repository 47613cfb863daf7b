"""The app factory: create_app(engine or ModelState, ServerConfig) -> a Flask WSGI app.

Routes: POST /v1/chat/completions (chat.py), POST /v1/completions (completions.py),
POST /v1/inspect (inspection.py), GET /v1/models, /health, /docs, /openapi.json (meta.py), and
the web chat: the page at / and its WebSocket /v1/ws (webchat.py).
Around every request: an id and one log line, the API key check, CORS headers when asked for,
and errors.py turning anything that goes wrong into OpenAI's error envelope.
"""

import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from urllib.parse import urlsplit

import flask_smorest
from flask import Flask, g, request

from refimpl import __version__

from webapp import chat, completions, errors, inspection, meta, metrics, webchat
from webapp.common import RequestLog, api_key_matches
from webapp.errors import ApiError
from webapp.schemas import ChatCompletionChunk, ErrorResponse, either2properties

# Routes anyone may call when an API key is set: the health check, the documentation, the icon
# and the chat page (whose WebSocket asks for the key itself: see the before_request hook).
PUBLIC_ENDPOINTS = {"models.health", "api-docs.openapi_json", "api-docs.openapi_swagger_ui", "docs_static",
                    "openapi_alias", "favicon", "webchat.page", "webchat.asset"}
WEBSOCKET_ENDPOINT = "webchat.websocket"


def keep_alive_from_env():
    """KEEP_ALIVE_INTERVAL in milliseconds, as mistral.rs reads it (default 10000)."""
    value = os.environ.get("KEEP_ALIVE_INTERVAL", "10000")
    if not value.isdigit() or int(value) <= 0:
        raise ValueError(f"KEEP_ALIVE_INTERVAL must be a positive number of milliseconds, not {value!r}")
    return int(value)


@dataclass
class ServerConfig:
    api_key: str | None = None  # when set, every route but PUBLIC_ENDPOINTS needs "Authorization: Bearer KEY"
    cors_origins: tuple = ()  # origins allowed to call from a browser ("*" for any); none: no CORS headers
    max_body_bytes: int = 1 << 20  # larger request bodies get 413, larger WebSocket messages close it (1009)
    keep_alive_ms: int = field(default_factory=keep_alive_from_env)
    read_timeout_s: float = 30  # a connection silent this long while sending a body or reading a reply is closed
    ws_ping_s: float = 20  # an open WebSocket is pinged this often, and closed if the last ping got no pong
    ws_idle_s: float = 600  # a WebSocket that sends nothing and waits for no reply this long is closed


class Api(flask_smorest.Api):
    ERROR_SCHEMA = ErrorResponse  # every documented error response is OpenAI's envelope


def create_app(state, config=None):
    """A Flask app serving the model of a serving.ModelState (loaded, or still loading)."""
    config = config or ServerConfig()
    app = Flask("webapp")
    app.json.sort_keys = False  # keep OpenAI's field order
    app.config.update(
        MAX_CONTENT_LENGTH=config.max_body_bytes,
        API_TITLE="refimpl", API_VERSION=__version__, OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/", OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="docs", OPENAPI_SWAGGER_UI_URL=meta.SWAGGER_UI_URL,
        OPENAPI_SWAGGER_UI_CONFIG={"validatorUrl": None},  # Swagger UI would otherwise call validator.swagger.io
        API_SPEC_OPTIONS=spec_options(config),
        # simple-websocket: ping idle sockets, and close one whose message exceeds the body limit
        # (1009) as its bytes arrive, before anything is parsed.
        SOCK_SERVER_OPTIONS={"ping_interval": config.ws_ping_s, "max_message_size": config.max_body_bytes},
    )
    app.extensions["refimpl"] = SimpleNamespace(state=state, config=config, metrics=metrics.Metrics(state),
                                                draining=False)

    api = Api(app)
    api.ma_plugin.converter.add_attribute_function(either2properties)
    api.spec.components.schema("ChatCompletionChunk", schema=ChatCompletionChunk)  # named by the SSE description
    for blueprint in (chat.blp, completions.blp, inspection.blp, meta.blp):
        api.register_blueprint(blueprint)
    meta.register_docs(app, api)
    app.register_blueprint(webchat.bp)
    app.register_blueprint(metrics.bp)
    errors.register(app)

    @app.before_request
    def start():
        g.log = RequestLog(request.method, request.path)
        if app.extensions["refimpl"].draining:  # SIGTERM: finish what runs, admit nothing new
            raise ApiError(503, "the server is shutting down; retry on another instance or later",
                           code="server_shutting_down", headers={"Retry-After": "5"})
        if request.endpoint == WEBSOCKET_ENDPOINT:
            check_websocket_origin(config.cors_origins)
        if config.api_key is not None and request.endpoint not in PUBLIC_ENDPOINTS and request.method != "OPTIONS":
            if request.endpoint == WEBSOCKET_ENDPOINT and "Authorization" not in request.headers:
                g.websocket_authorised = False  # a browser cannot send the header: the socket asks for the key
            else:
                check_api_key(config.api_key)

    @app.after_request
    def finish(response):
        response.headers["X-Request-Id"] = g.log.request_id
        if config.cors_origins:
            add_cors_headers(response, config.cors_origins)
        app.extensions["refimpl"].metrics.requests.labels(str(response.status_code)).inc()
        if response.mimetype != "text/event-stream":  # a stream logs itself when it ends
            g.log.finish(response.status_code)
        return response

    return app


def spec_options(config):
    """OpenAPI document options: a description of the server's rules (Markdown, as Swagger UI renders
    it), and bearer auth when a key is set."""
    description = (
        "OpenAI's chat completions and completions API, with mistral.rs's extras, served by refimpl: a "
        "readable float32 reference engine, one model per process (GET /v1/models names it).\n\n"
        "- Extras beyond OpenAI's fields: `top_k`, `min_p`, `repetition_penalty`, token ids in `stop`, "
        "`messages` as a plain string, and speeds in `usage` (`avg_tok_per_sec`, `avg_prompt_tok_per_sec`, "
        "`avg_compl_tok_per_sec`).\n"
        "- `stream: true` answers with server-sent events: one chunk per `data:` event, `data: [DONE]` last, "
        "and `: keep-alive` comments while no token comes.\n"
        "- Unknown request fields are ignored; OpenAI features this server lacks (the deprecated functions and "
        "function_call, suffix, best_of) are refused with 400 rather than silently dropped.\n"
        "- `response_format` (json_object, json_schema) and `tools` decode under a grammar: the output is valid "
        "by construction unless max_tokens cuts it (finish_reason length).\n"
        "- Every error is OpenAI's envelope `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`, "
        "with its status: 400 invalid request, prompt too long for the context, or more than the server's "
        "limits could ever run; 401 missing or wrong API key; 403 the web chat's WebSocket opened from another "
        "site's page; 404; 408 the body stopped arriving; 413 body too large; 415 not JSON; 429 queue full "
        "(with Retry-After); 503 model loading or server shutting down.\n"
        "- `POST /v1/inspect` looks inside the model for a prompt: its tokens, the logit lens (what each layer "
        "would predict) and attention weights, from the reference forward pass (refimpl's own endpoint).\n"
        "- Besides the API: `GET /metrics` (Prometheus), and the web chat at `/`, which talks over the "
        "WebSocket `/v1/ws` (its protocol is under chat below; Try it out cannot open a WebSocket).")
    options = {"info": {"description": description}}
    if config.api_key is not None:
        options["info"]["description"] += (
            "\n\nThis server needs the header `Authorization: Bearer KEY` on every route but /health, /docs, "
            "/openapi.json, /favicon.ico and the web chat's page; /v1/ws may take the key in its first message.")
        options["components"] = {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}
        options["security"] = [{"bearer": []}]
    return options


def check_api_key(api_key):
    """401 unless the request carries "Authorization: Bearer <key>" (compared in constant time)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not api_key_matches(token, api_key):
        raise ApiError(401, "missing or incorrect API key: send the header \"Authorization: Bearer <key>\"",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def check_websocket_origin(allowed):
    """403 for a browser page that is neither this server's nor allowed by --cors-origin.

    Browsers let any page open a WebSocket to any host, and send the page's Origin with it:
    without this check, every site a user visits could drive their local model (cross-site
    WebSocket hijacking). Clients that are not browsers send no Origin and are not affected."""
    origin = request.headers.get("Origin")
    if origin is None or "*" in allowed or origin in allowed or urlsplit(origin).netloc == request.host:
        return
    raise ApiError(403, f"WebSocket connections from pages at {origin} are not allowed; start the server with "
                        f"--cors-origin {origin} to allow them", code="origin_not_allowed")


def add_cors_headers(response, origins):
    origin = request.headers.get("Origin")
    if origin is None or ("*" not in origins and origin not in origins):
        return
    response.headers["Access-Control-Allow-Origin"] = "*" if "*" in origins else origin
    response.headers["Vary"] = "Origin"
    if request.method == "OPTIONS":  # a preflight
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        response.headers["Access-Control-Max-Age"] = "600"
