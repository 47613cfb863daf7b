"""GET /v1/ws: the same streamed completions over one WebSocket, for browsers and long sessions.

The client sends one JSON message per request,

    {"path": "/v1/chat/completions", "body": {...the request body...}}    (or "/v1/completions")

and receives the chunks the SSE stream would carry (stream is implied), one JSON text message
each, then the text "[DONE]". A bad request is answered with OpenAI's error envelope, and the
socket stays open for the next one. The socket is authorised once, at the HTTP handshake
(Authorization: Bearer, like every other route).
"""

import json

from flask import Blueprint, g, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed

from webapp import chat, completions
from webapp.common import RequestLog
from webapp.errors import ApiError, from_exception
from webapp.parsing import parse_json_text
from webapp.schemas import ChatCompletionChunk, ChatCompletionRequest, CompletionRequest, CompletionResponse

bp = Blueprint("ws", __name__)
sock = Sock()

ROUTES = {
    "/v1/chat/completions": (ChatCompletionRequest(), chat, ChatCompletionChunk(), "messages"),
    "/v1/completions": (CompletionRequest(), completions, CompletionResponse(), "prompt"),
}


@sock.route("/v1/ws", bp=bp)
def websocket(ws):
    while True:
        message = ws.receive()
        g.log = RequestLog("WS", request.path)
        prompt_param, status = None, 200
        try:
            value = parse_json_text(message if isinstance(message, str) else message.decode("utf-8"))
            if not isinstance(value, dict) or value.get("path") not in ROUTES:
                raise ApiError(400, f"a message is {{\"path\": one of {sorted(ROUTES)}, \"body\": {{...}}}}",
                               "path", "invalid_value")
            schema, module, chunk_schema, prompt_param = ROUTES[value["path"]]
            body = schema.load(value.get("body"))
            job = module.prepare(body)
            for chunk in module.chunks(job):
                ws.send(json.dumps(chunk_schema.dump(chunk)))
            ws.send("[DONE]")
        except ConnectionClosed:
            g.log.finish(499, note="client went away")
            raise
        except UnicodeDecodeError:
            status = 400
            ws.send(json.dumps(ApiError(400, "invalid JSON body: not UTF-8", code="invalid_json").envelope()))
        except Exception as err:  # noqa: BLE001 - every error is answered with the envelope
            error = from_exception(err, prompt_param, g.log.request_id)
            status = error.status
            ws.send(json.dumps(error.envelope()))
        g.log.finish(status)
