"""The one place that turns every error into OpenAI's envelope.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "top_p", "code": "invalid_value"}}

Whatever goes wrong, a client gets this JSON with the right status: never an HTML page, never a
traceback (an unexpected exception is logged with its traceback and answered 500 with the
request id, so the two can be matched).
"""

import json
import logging

from flask import g, request
from gunicorn.http.errors import NoMoreData, ParseException
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from refimpl.engine import EngineFull, EngineStopped, NeverFits
from refimpl.generate import ContextLengthExceeded
from refimpl.sampling import InvalidParameter
from refimpl.tokenizer import ChatTemplateError

from webapp.serving import ClientDisconnected, ModelNotFound, ModelNotReady

log = logging.getLogger("refimpl.server")

# The field that holds the prompt, by blueprint: where a context_length_exceeded points.
PROMPT_PARAM = {"chat": "messages", "completions": "prompt"}


class ApiError(Exception):
    """An error with everything the envelope needs; views raise it for what only they can see."""

    def __init__(self, status, message, param=None, code=None, type=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def envelope(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def from_exception(err, prompt_param=None, request_id="-"):
    """Map any exception to an ApiError (an unexpected one is logged with its traceback)."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, ValidationError):
        param, message = first_error(err.messages)
        return ApiError(400, f"{param or 'request body'}: {message}", param, "invalid_value")
    if isinstance(err, InvalidParameter):
        return ApiError(400, str(err), err.param, "invalid_value")
    if isinstance(err, ContextLengthExceeded):
        return ApiError(400, str(err), prompt_param, "context_length_exceeded")
    if isinstance(err, ChatTemplateError):
        return ApiError(400, str(err), "messages", "invalid_value")
    if isinstance(err, NeverFits):
        return ApiError(400, str(err), err.param, "invalid_value")
    if isinstance(err, EngineFull):
        return ApiError(429, f"the server is busy: {err}; retry shortly", code="rate_limit_exceeded",
                        type="rate_limit_error", headers={"Retry-After": "1"})
    if isinstance(err, EngineStopped):
        return ApiError(503, str(err), code="server_shutting_down", headers={"Retry-After": "5"})
    if isinstance(err, ModelNotReady):
        return ApiError(503, str(err), code=err.code)
    if isinstance(err, ModelNotFound):
        return ApiError(404, str(err), "model", "model_not_found")
    if isinstance(err, (ParseException, NoMoreData)):  # gunicorn reading the body: e.g. a malformed chunk
        return ApiError(400, f"malformed request body: {err}", code="invalid_body")
    if isinstance(err, TimeoutError) or isinstance(err.__context__, TimeoutError):
        # the socket's read timeout (server.py) while reading the body; werkzeug's reader turns it
        # into its own ClientDisconnected, with the timeout as the context
        return ApiError(408, "the request body did not arrive in time", code="request_timeout")
    if isinstance(err, ClientDisconnected):  # nobody reads this answer; 499 is what the log says
        return ApiError(499, str(err), code="client_disconnected")
    if isinstance(err, HTTPException):
        return from_http_exception(err)
    log.error("request %s: unexpected error", request_id, exc_info=err)
    return ApiError(500, f"internal server error (request id {request_id})", code="internal_error")


HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
              415: "unsupported_media_type"}


def from_http_exception(err):
    """werkzeug's own errors: unknown route, wrong method, body over the limit, ..."""
    status = err.code or 500
    if status == 404:
        message = f"no such route: {request.method} {request.path}"
    elif status == 405:
        message = f"{request.method} is not allowed on {request.path}"
    elif status == 413:
        limit = request.max_content_length
        message = f"the request body is larger than this server accepts ({limit} bytes)"
    else:
        message = err.description or err.name
    headers = {k: v for k, v in err.get_headers() if k.lower() == "allow"}  # 405 says what is allowed
    return ApiError(status, message, code=HTTP_CODES.get(status, err.name.lower().replace(" ", "_")),
                    headers=headers)


def first_error(messages, path=""):
    """(param, message) of the first error in marshmallow's nested messages, e.g. messages[0].role."""
    while isinstance(messages, dict):
        key, value = next(iter(messages.items()))
        if isinstance(value, dict) and value and set(value) <= {"key", "value"}:  # a Dict entry: stop at the field
            return path or None, f"{key!r}: {first_error(value)[1]}"
        if key != "_schema":
            path = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
        messages = value
    if isinstance(messages, list):
        messages = messages[0] if messages else "invalid"
        if isinstance(messages, (dict, list)):
            return first_error(messages, path)
    return path or None, str(messages)


def error_response(app, err):
    """The Flask response for an ApiError."""
    response = app.response_class(json.dumps(err.envelope()), status=err.status, mimetype="application/json")
    for name, value in err.headers.items():
        response.headers[name] = value
    return response


def register(app):
    """Route every exception through from_exception (HTTPException too: it replaces flask-smorest's handler)."""
    def handle(err):
        request_log = g.get("log")
        request_id = request_log.request_id if request_log else "-"
        return error_response(app, from_exception(err, PROMPT_PARAM.get(request.blueprint), request_id))

    app.register_error_handler(HTTPException, handle)
    app.register_error_handler(Exception, handle)
