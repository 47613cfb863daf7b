"""Server-sent events: one `data: {json}` event per chunk, `data: [DONE]` at the end, and keep-alives.

The chunks come from a generator that follows a Job (serving.py) and yields None whenever no
event came for a moment; whenever KEEP_ALIVE_INTERVAL milliseconds pass without a chunk (a long
prefill, a queue, or text held back for a stop string), the SSE comment `: keep-alive` is sent,
which clients ignore but proxies and idle timers see as traffic.

Closing this response (the server does, when a write to a vanished client fails) closes the
chunk generator, and with it the Job, which cancels the generation; a client found gone by the
Job ends the stream the same way. An error after the first event can no longer change the
status, so it is sent as one event holding OpenAI's error envelope (the openai client raises
it as an APIError), followed by [DONE].
"""

import json
import time

from flask import Response, current_app

from webapp.errors import from_exception
from webapp.serving import ClientDisconnected

KEEP_ALIVE = ": keep-alive\n\n"

# How the OpenAPI document describes one event of these streams (before OpenAPI 3.2, a
# text/event-stream schema describes each event). The chunk schemas are in the document's components.
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "description": "One chunk as JSON (ChatCompletionChunk for chat, CompletionResponse with "
                                     "finish_reason null until the last for completions), then [DONE]."}}}
DONE = "data: [DONE]\n\n"
CANCELED = "finish_reason canceled: the client disconnected"


def data(obj):
    return f"data: {json.dumps(obj)}\n\n"


def stream_response(chunks, schema, log):
    """Stream the dicts of the `chunks` generator (None: nothing yet), each dumped through `schema`."""
    keep_alive_s = current_app.extensions["refimpl"].config.keep_alive_ms / 1000
    return Response(events(chunks, schema, keep_alive_s, log), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def events(chunks, schema, keep_alive_s, log):
    note, last_write = CANCELED, time.monotonic()
    try:
        for chunk in chunks:
            if chunk is not None:
                yield data(schema.dump(chunk))
            elif time.monotonic() - last_write >= keep_alive_s:
                yield KEEP_ALIVE
            else:
                continue
            last_write = time.monotonic()
        note = ""
        yield DONE
    except ClientDisconnected:
        pass  # nobody to write to
    except Exception as err:  # noqa: BLE001 - every error becomes the last event
        note = "stream error"
        yield data(from_exception(err, request_id=log.request_id).envelope())
        yield DONE  # the stream is over: clients waiting for [DONE] are not left hanging
    finally:
        chunks.close()  # if the server closed us early (GeneratorExit), this cancels the generation
        log.finish(200, note=note)
