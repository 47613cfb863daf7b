"""Reading a request body: strict JSON, then the marshmallow schema of the route.

Python's json module is lenient where a server should not be: it reads NaN and Infinity, turns
1e999 into inf, keeps unpaired UTF-16 surrogates ("\\ud800") in strings, and nests as deep as
the interpreter's stack allows. Each of those is refused here with a 400, before any schema or
model sees the data.
"""

import json
import math
import re

import flask_smorest
from marshmallow import ValidationError
from webargs.flaskparser import FlaskParser
from werkzeug.exceptions import RequestEntityTooLarge

from webapp.errors import ApiError

MAX_DEPTH = 64
SURROGATE = re.compile("[\ud800-\udfff]")


def invalid_json(message):
    return ApiError(400, f"invalid JSON body: {message}", code="invalid_json")


def reject_constant(name):
    raise invalid_json(f"{name} is not JSON")


def finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise invalid_json(f"the number {text[:40]} is too large")
    return value


def parse_json_body(request):
    """The request's JSON value, or an ApiError: 415 not JSON, 400 malformed, 413 too large (werkzeug)."""
    if not request.is_json:
        raise ApiError(415, f"Content-Type must be application/json, not {request.mimetype or 'missing'}",
                       code="unsupported_media_type")
    raw = request.get_data(cache=True)  # raises 413 beyond MAX_CONTENT_LENGTH when Content-Length says so
    if request.content_length is None and request.max_content_length and len(raw) >= request.max_content_length:
        raise RequestEntityTooLarge()  # a chunked body: werkzeug stops reading at the limit without saying so
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise invalid_json(f"not UTF-8 (byte {err.start})") from None
    return parse_json_text(text)


def parse_json_text(text):
    """Parse JSON text strictly (see the module docstring)."""
    if not text.strip():
        raise invalid_json("the body is empty")
    try:
        value = json.loads(text, parse_constant=reject_constant, parse_float=finite_float)
    except RecursionError:
        raise invalid_json(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as err:  # JSONDecodeError, and int() of a number with too many digits
        raise invalid_json(str(err)) from None
    check_tree(value)
    return value


def check_tree(value):
    """Refuse nesting deeper than MAX_DEPTH and strings with unpaired surrogates (not Unicode text)."""
    stack = [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise invalid_json(f"nested deeper than {MAX_DEPTH} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and SURROGATE.search(key):
                    raise invalid_json("a key holds an unpaired UTF-16 surrogate")
                stack.append((item, depth + 1))
        elif isinstance(value, str) and SURROGATE.search(value):
            raise invalid_json("a string holds an unpaired UTF-16 surrogate")


class StrictParser(FlaskParser):
    """webargs' parser with strict JSON, and schema errors left to errors.py (400, never 422)."""

    DEFAULT_VALIDATION_STATUS = 400

    def _raw_load_json(self, req):
        return parse_json_body(req)

    def handle_error(self, error, req, schema, *, error_status_code, error_headers):
        raise ValidationError(error.messages.get("json", error.messages))  # webargs nests them under "json"


class Blueprint(flask_smorest.Blueprint):
    ARGUMENTS_PARSER = StrictParser()

