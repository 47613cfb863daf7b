"""Where requests meet refimpl's batching engine: the model once loaded, and one way to follow a request.

Request handlers never run the model. They submit to the engine (refimpl.engine.Engine), whose own
thread runs one forward pass per step over every running sequence, and read their requests'
events through Job.events(), the one place where a request is cancelled. It cancels every engine
request of the job when the reader stops (the response is complete, failed, or could not be
written) and when the client's connection is found closed: it looks at the socket itself every
POLL_SECONDS, so a client that leaves is noticed within about one engine step whether its request
waits in the queue, prefills, decodes, or holds back text that might become a stop string.
"""

import logging
import select
import socket
import threading
import time
from pathlib import Path

from refimpl.engine import DONE, Engine
from refimpl.generate import load

log = logging.getLogger("refimpl.server")

POLL_SECONDS = 0.05  # how often a waiting handler looks at its client's connection (an engine step is 30-100 ms)


class ModelNotReady(RuntimeError):
    """The model is still loading, or failed to (the server answers 503)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class ModelNotFound(LookupError):
    """A request names a model this server does not serve (404)."""


class ClientDisconnected(Exception):
    """The client closed its connection before the response was complete."""


class ModelState:
    """The engine once the model is loaded; until then (or if loading failed) requests get 503."""

    def __init__(self, engine=None, model_id=None):
        self.engine, self.model_id, self.error = engine, model_id, None

    @classmethod
    def loaded(cls, path, model_id=None, device="cpu", **limits):
        """A state whose model is loaded now (scripts and tests); its id is the directory's name."""
        return cls(open_engine(path, device, **limits), model_id or Path(path).name)

    def load_in_background(self, open_engine, model_id):
        """Run open_engine() in a thread, so that the server answers /health (503) while it loads."""
        def run():
            try:
                engine = open_engine()
                self.model_id = model_id
                self.engine = engine  # requests see it only once it is complete
                log.info("model %s loaded", model_id)
            except Exception as err:  # reported by /health and every request
                log.exception("loading the model failed")
                self.error = f"{type(err).__name__}: {err}"

        threading.Thread(target=run, name="load-model", daemon=True).start()
        return self

    def get(self):
        if self.engine is not None:
            return self.engine
        if self.error:
            raise ModelNotReady(f"the model failed to load: {self.error}", "model_load_failed")
        raise ModelNotReady("the model is still loading; try again shortly", "model_not_ready")


def open_engine(path, device="cpu", offload=None, **limits):
    """refimpl's batching engine on the model in directory `path`; `offload` runs the slow parts
    (reading the weights, forward passes) where a cooperative server wants them (refimpl.engine)."""
    offload = offload or (lambda f, *args: f(*args))
    model, tokenizer, stop_ids = offload(load, path, device)
    return Engine(model, tokenizer, stop_ids, offload=offload, **limits)


def current_model(state, requested_model):
    """The state of the loaded model if `requested_model` names it; ModelNotReady, ModelNotFound."""
    state.get()
    if requested_model not in (None, "", "default", state.model_id):
        raise ModelNotFound(f"the model {requested_model!r} does not exist; this server serves "
                            f"{state.model_id!r} (or use \"\" or \"default\")")
    return state


class Client:
    """The connection of one request, asked directly whether the client has closed it.

    A closed connection reads as end-of-file: the socket turns readable and a peek returns no
    bytes. (A client that sends more, such as a pipelined request, is still there.)"""

    def __init__(self, sock):
        self.sock = sock  # None where there is no socket (Flask's test client): never gone

    @classmethod
    def of(cls, environ):
        return cls(environ.get("gunicorn.socket") or environ.get("werkzeug.socket"))

    def gone(self):
        if self.sock is None:
            return False
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            return bool(readable) and self.sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # reset, or already closed (fileno -1)
            return True


class Caller:
    """Who a request is for: the app's model state and metrics, its log line, its connection."""

    def __init__(self, state, metrics, log, client):
        self.state, self.metrics, self.log, self.client = state, metrics, log, client

    def model(self, requested_model):
        """The loaded model's state, if the request names it: "", "default" or its id."""
        return current_model(self.state, requested_model)

    def submit(self, prompts, params, score_top=None):
        """Submit one generation per prompt, all or none, and follow them as one Job."""
        return Job(self.state.get().submit_all(prompts, params, score_top), self)


class Job:
    """The engine requests that answer one API request: read in order, cancelled together."""

    def __init__(self, requests, caller):
        self.requests, self.caller = requests, caller

    def events(self, poll=POLL_SECONDS):
        """Yield (request number, Event) as they come, and None whenever `poll` seconds pass without
        one (a streaming response sends keep-alives, the WebSocket reads its client's messages).

        Raises ClientDisconnected when the connection is found closed. However the iteration
        ends, every request of the job is cancelled: that frees a finished request of nothing, and
        the engine drops a cancelled one at its next step, wherever it was."""
        metrics, client = self.caller.metrics, self.caller.client
        started = checked = time.perf_counter()
        last = None
        try:
            for number, request in enumerate(self.requests):
                while True:
                    event = request.get(timeout=poll)
                    now = time.perf_counter()
                    if now - checked >= poll:  # also while events come but release no text to write
                        checked = now
                        if client.gone():
                            metrics.disconnects.inc()
                            raise ClientDisconnected("the client closed the connection")
                    if event is DONE:
                        break
                    if event is None:
                        yield None
                        continue
                    metrics.token(now - (last or started), first=last is None)
                    last = now
                    yield number, event
        except GeneratorExit:  # the reader stopped early: a write to the client failed
            metrics.disconnects.inc()
            raise
        finally:
            self.cancel()

    def cancel(self):
        for request in self.requests:
            request.cancel()

    def usages(self):
        return [request.usage for request in self.requests]
