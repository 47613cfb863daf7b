"""The web chat: the page at / and its WebSocket, /v1/ws, which streams a reply token by token
together with what the model and the sampler saw at each token (refimpl/explain.py).

The protocol is a few typed JSON messages, each an object whose "type" says what it is; there
are no in-band sentinel strings. Client to server:

    {"type": "auth", "api_key": "KEY"}          when hello says auth_required (a browser cannot
                                                 set an Authorization header on a WebSocket)
    {"type": "chat", "id": "r1", "messages": [{"role": "user", "content": "Hi"}],
     "settings": {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "min_p": 0.05,
                  "max_tokens": 256, "seed": 1, "response_format": {"type": "json_object"}},
                                                 each optional; null or absent: the API default
     "alternatives": 10}                         optional, 10 to 20
    {"type": "cancel", "id": "r1"}               stop that reply (its done event says "canceled")
    {"type": "inspect", "id": "i1", "request": {...}}   look inside the model: the request is a
                                                 POST /v1/inspect body (webapp/inspection.py)

Server to client:

    {"type": "hello", "protocol": 1, "model": "...", "auth_required": false}     on connect
    {"type": "token", "id", "index", "token_id", "text", "bytes", "offset", "delta", "special",
     "p", "logprob", "rank", "alternatives": [{"token_id", "text", "bytes", "special", "p",
     "p_temp", "kept", "removed_by", "chosen"}, ...], "other_p", "other_p_temp", "top_p_cut"}
    {"type": "done", "id", "finish_reason": "stop" | "length" | "canceled", "content", "usage",
     "request_id"}                              request_id: the reply's id in the server's log
    {"type": "inspection", "id", "inspection": {...}}   the POST /v1/inspect response
    {"type": "error", "id" (null if the message had none), "status", "error": {"message",
     "type", "param", "code"}}                  ends that reply; the socket stays open

A token's `offset` is where it starts in the reply, in code points; tokens that hold the parts
of one character share it. `delta` is the text it releases (appending the deltas gives the
reply). The README describes every field.

A chat goes through the HTTP API's own path: the same request schema and limits, the same
engine, the same API key. One reply runs at a time per socket; while it streams, the socket is
read between tokens, so that a cancel takes effect at the next engine step.

Limits (ServerConfig): a message larger than the HTTP body limit closes the socket with 1009
before it is parsed; the server pings every ws_ping_s seconds and closes a socket whose last ping
got no pong; a socket that sends nothing and waits for no reply for ws_idle_s seconds is closed
(1000), and so is an idle one when the server drains for shutdown (1001). The handshake refuses
pages of other origins (app.py, check_websocket_origin).
"""

import json
import time
from dataclasses import asdict
from pathlib import Path

from flask import Blueprint, current_app, g, send_from_directory
from flask_sock import Sock
from marshmallow import RAISE, Schema, fields, validate
from simple_websocket import ConnectionClosed
from wsproto.frame_protocol import CloseReason

from webapp import chat, inspection
from webapp.common import RequestLog, api_key_matches, usage
from webapp.errors import ApiError, from_exception
from webapp.serving import Caller, ClientDisconnected
from webapp.parsing import parse_json_text
from webapp.schemas import ChatCompletionRequest, InspectRequest, Integer

PROTOCOL = 1
PAGE = Path(__file__).parent / "static" / "chat"
POLL_SECONDS = 0.05  # how often a streaming reply looks for a cancel message while no token comes
IDLE_TICK_SECONDS = 0.5  # how often an idle socket looks at the clock and at draining

bp = Blueprint("webchat", __name__)
sock = Sock()


@bp.route("/")
def page():
    return send_from_directory(PAGE, "index.html")


@bp.route("/chat/<path:filename>")
def asset(filename):
    return send_from_directory(PAGE, filename)


class Strict(Schema):
    class Meta:
        unknown = RAISE  # a typed protocol: a misspelt field is an error, not silently dropped


class Settings(Strict):
    """The sampling settings the page offers; their types and ranges are checked as the API checks them."""
    temperature = fields.Raw(allow_none=True)
    top_p = fields.Raw(allow_none=True)
    top_k = fields.Raw(allow_none=True)
    min_p = fields.Raw(allow_none=True)
    max_tokens = fields.Raw(allow_none=True)
    seed = fields.Raw(allow_none=True)
    response_format = fields.Raw(allow_none=True)  # {"type": "json_object"}: the reply decodes under a grammar


class Message(Strict):
    type = fields.String(required=True)


class ChatStartMessage(Message):
    id = fields.String(required=True, validate=validate.Length(1, 64))
    messages = fields.Raw(required=True)
    settings = fields.Nested(Settings, load_default=dict)
    alternatives = Integer(load_default=10, validate=validate.Range(10, 20))


class AuthMessage(Message):
    api_key = fields.String(required=True)


class CancelMessage(Message):
    id = fields.String(required=True)


class InspectMessage(Message):
    id = fields.String(required=True, validate=validate.Length(1, 64))
    request = fields.Dict(required=True)  # a POST /v1/inspect body, checked by its schema


MESSAGES = {"auth": AuthMessage(), "chat": ChatStartMessage(), "cancel": CancelMessage(),
            "inspect": InspectMessage()}


@sock.route("/v1/ws", bp=bp)
def websocket(ws):
    ChatSocket(ws, authorised=g.get("websocket_authorised", True)).run()


class ChatSocket:
    def __init__(self, ws, authorised):
        self.ws, self.authorised = ws, authorised
        self.app = current_app.extensions["refimpl"]  # state, config, metrics, draining
        self.log = g.log  # the handshake's log line: errors outside a reply are reported under its id
        self.reply = None  # (id, engine request) of the reply streaming now

    def send(self, **message):
        self.ws.send(json.dumps(message))

    def run(self):
        state = self.app.state
        self.send(type="hello", protocol=PROTOCOL, model=state.model_id if state.engine else None,
                  auth_required=not self.authorised)
        last_active = time.monotonic()
        while True:
            raw = self.ws.receive(timeout=IDLE_TICK_SECONDS)
            if raw is not None:
                self.handle(raw)
                last_active = time.monotonic()
            elif self.app.draining:
                self.ws.close(CloseReason.GOING_AWAY, "the server is shutting down")
                return
            elif time.monotonic() - last_active > self.app.config.ws_idle_s:
                self.ws.close(CloseReason.NORMAL_CLOSURE, f"idle for {self.app.config.ws_idle_s:g} s")
                return

    def handle(self, raw):
        """Act on one client message; every mistake in it is answered with an error event."""
        message_id = None
        try:
            message = parse_json_text(raw if isinstance(raw, str) else raw.decode("utf-8"))
            if not isinstance(message, dict) or not isinstance(message.get("type"), str) \
                    or message["type"] not in MESSAGES:
                raise ApiError(400, f"a message is a JSON object whose \"type\" is one of {sorted(MESSAGES)}",
                               "type", "invalid_value")
            message_id = message.get("id") if isinstance(message.get("id"), str) else None
            message = MESSAGES[message["type"]].load(message)
            if message["type"] == "auth":
                self.authenticate(message["api_key"])
            elif message["type"] == "cancel":
                if self.reply and self.reply[0] == message["id"]:  # otherwise it already ended: nothing to do
                    self.reply[1].cancel()
            elif self.reply:
                raise ApiError(409, f"reply {self.reply[0]!r} is still streaming; cancel it or wait for its done event",
                               code="request_in_progress")
            elif not self.authorised:
                raise ApiError(401, "this server needs an API key: send {\"type\": \"auth\", \"api_key\": ...} first",
                               code="invalid_api_key")
            elif message["type"] == "inspect":
                self.inspect(message)
            else:
                self.stream(message)
        except ConnectionClosed:
            raise
        except UnicodeDecodeError:
            self.send_error(message_id, ApiError(400, "a message must be UTF-8 text", code="invalid_json"))
        except Exception as err:  # noqa: BLE001 - every error is answered with the envelope
            self.send_error(message_id, err)

    def send_error(self, message_id, err, log=None):
        """Answer with an error event (OpenAI's envelope inside); returns the ApiError sent."""
        error = from_exception(err, "messages", (log or self.log).request_id)
        self.send(type="error", id=message_id, status=error.status, **error.envelope())
        return error

    def authenticate(self, key):
        api_key = self.app.config.api_key
        if api_key is not None and not api_key_matches(key, api_key):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")
        self.authorised = True

    def stream(self, message):
        """Run one chat reply, sending a token event per generated token, then done (or an error)."""
        log = RequestLog("WS", "/v1/ws chat")  # one log line per reply, as per HTTP request
        reply_id = message["id"]
        try:
            body = ChatCompletionRequest().load({"messages": message["messages"], **message["settings"]})
            reply = chat.prepare(body, Caller(self.app.state, self.app.metrics, log, self), message["alternatives"])
        except Exception as err:  # noqa: BLE001 - refused before any work: an error event
            log.finish(self.send_error(reply_id, err, log).status)
            return
        self.reply, content, finish, index = (reply_id, reply.job), [], None, 0
        try:
            for item in reply.job.events(poll=POLL_SECONDS):
                if item is not None:
                    _, event = item
                    content.append(event.text)
                    finish = event.finish_reason or finish
                    self.send(**token_event(reply_id, index, event))
                    index += 1
                self.read_pending_messages()  # a cancel takes effect at the next engine step
        except (ConnectionClosed, ClientDisconnected, OSError):
            log.finish(499, note="client went away")
            raise ConnectionClosed(CloseReason.ABNORMAL_CLOSURE, "client went away") from None
        except Exception as err:  # noqa: BLE001 - the reply ends with an error event
            log.finish(self.send_error(reply_id, err, log).status)
            return
        finally:
            self.reply = None
        log.usage = usage(reply.job.usages())
        self.send(type="done", id=reply_id, finish_reason=finish or "canceled", content="".join(content),
                  usage=log.usage, request_id=log.request_id)
        log.finish(200, note="" if finish else "finish_reason canceled")

    def inspect(self, message):
        """Answer one inspect message with the /v1/inspect response (an inspection event) or an error."""
        log = RequestLog("WS", "/v1/ws inspect")
        try:
            body = InspectRequest().load(message["request"])
            result = inspection.run(body, Caller(self.app.state, self.app.metrics, log, self))
        except Exception as err:  # noqa: BLE001 - answered with an error event
            log.finish(self.send_error(message["id"], err, log).status)
            return
        self.send(type="inspection", id=message["id"], inspection=result)
        log.finish(200)

    def gone(self):
        """For serving.Job: the client closed the socket (simple-websocket's reader saw it)."""
        return not self.ws.connected

    def read_pending_messages(self):
        while (raw := self.ws.receive(timeout=0)) is not None:
            self.handle(raw)


def token_event(reply_id, index, event):
    insight = event.insight
    chosen = next(a for a in insight.alternatives if a.chosen)
    return {"type": "token", "id": reply_id, "index": index, "token_id": event.token_id, "text": chosen.text,
            "bytes": chosen.bytes, "offset": event.offset, "delta": event.text, "special": chosen.special,
            "p": insight.p, "logprob": insight.logprob, "rank": insight.rank,
            "alternatives": [asdict(a) for a in insight.alternatives], "other_p": insight.other_p,
            "other_p_temp": insight.other_p_temp, "top_p_cut": insight.top_p_cut}
