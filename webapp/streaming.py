"""Server-sent events: one `data: {json}` event per chunk, `data: [DONE]` at the end, and keep-alives.

The chunks are produced in a background thread and handed over through a queue. The response
waits on that queue with a timeout: whenever KEEP_ALIVE_INTERVAL milliseconds pass without a
chunk (a long prefill, or other requests holding the model), it sends the SSE comment
`: keep-alive`, which clients ignore but proxies and idle timers see as traffic.

When the client goes away, the WSGI server closes the response; the producer notices at its
next step and stops generating. An error after the first event can no longer change the
status, so it is sent as one event holding OpenAI's error envelope (the openai client raises it
as an APIError), followed by [DONE].
"""

import json
import queue
import threading

from flask import Response, current_app, g

from webapp.errors import from_exception

KEEP_ALIVE = ": keep-alive\n\n"

# How the OpenAPI document describes one event of these streams (before OpenAPI 3.2, a
# text/event-stream schema describes each event). The chunk schemas are in the document's components.
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "description": "One chunk as JSON (ChatCompletionChunk for chat, CompletionResponse with "
                                     "finish_reason null until the last for completions), then [DONE]."}}}
DONE = "data: [DONE]\n\n"


def data(obj):
    return f"data: {json.dumps(obj)}\n\n"


def stream_response(chunks, schema):
    """sse_response for the request being served: the app's keep-alive interval, the request's log."""
    return sse_response(chunks, schema, current_app.extensions["refimpl"].config.keep_alive_ms, g.log)


def sse_response(chunks, schema, keep_alive_ms, log):
    """Stream the dicts of the `chunks` generator, each dumped through `schema`, as server-sent events."""
    return Response(events(chunks, schema, keep_alive_ms / 1000, log), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def events(chunks, schema, keep_alive_s, log):
    items, cancelled = queue.Queue(), threading.Event()

    def produce():
        try:
            for chunk in chunks:
                items.put(("chunk", chunk))
                if cancelled.is_set():
                    break
            else:
                items.put(("done", None))
        except Exception as err:  # noqa: BLE001 - every error becomes the last event
            items.put(("error", err))
        finally:
            chunks.close()

    threading.Thread(target=produce, name=f"stream-{log.request_id}", daemon=True).start()
    status = "cancelled"
    try:
        while True:
            try:
                kind, item = items.get(timeout=keep_alive_s)
            except queue.Empty:
                yield KEEP_ALIVE
                continue
            if kind == "chunk":
                yield data(schema.dump(item))
            elif kind == "error":
                status = "error"
                yield data(from_exception(item, request_id=log.request_id).envelope())
                yield DONE  # the stream is over: clients waiting for [DONE] are not left hanging
                return
            else:
                status = "done"
                yield DONE
                return
    finally:
        cancelled.set()
        notes = {"done": "", "cancelled": "finish_reason canceled: the client disconnected", "error": "stream error"}
        log.finish(200, note=notes[status])
