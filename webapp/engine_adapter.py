"""The one place the server calls the engine: a model loaded once, shared by every request thread.

Request threads never run the model. They submit to refimpl's batching engine, whose own thread
runs one forward pass per step over every running sequence, and read their request's events.
A full queue is refused at once with 429 and Retry-After; a client that goes away (the event
iterator is closed before the end) has its request cancelled, which frees its KV caches within
one engine step.
"""

import logging
import threading
import time
from pathlib import Path

from refimpl.engine import Engine as BatchingEngine
from refimpl.engine import DONE, EngineFull, EngineStopped
from refimpl.explain import token_text
from refimpl.generate import default_stop_ids, prompt_logprobs
from refimpl.model import load_model
from refimpl.tokenizer import Tokenizer

from webapp.errors import ApiError

log = logging.getLogger("refimpl.server")


class Engine:
    """A model, its tokenizer and stop ids, and the batching engine that runs them."""

    def __init__(self, model, tokenizer, stop_ids, model_id, max_seqs=16, max_queue=64):
        self.model, self.tokenizer, self.stop_ids, self.model_id = model, tokenizer, set(stop_ids), model_id
        self.vocab_size = model.config.vocab_size
        self.batcher = BatchingEngine(model, tokenizer, stop_ids, max_seqs=max_seqs, max_queue=max_queue)
        self.metrics = None  # webapp.metrics.Metrics, set by the app

    @classmethod
    def load(cls, path, model_id=None, device="cpu", max_seqs=16, max_queue=64):
        model, tokenizer = load_model(path, device), Tokenizer.from_dir(path)
        return cls(model, tokenizer, default_stop_ids(tokenizer, model.config, path), model_id or Path(path).name,
                   max_seqs, max_queue)

    def chat_prompt(self, messages):
        return self.tokenizer.encode_chat(messages)

    def text_prompt(self, text):
        return self.tokenizer.encode(text)

    def decode(self, ids):
        return self.tokenizer.decode(ids)

    def piece(self, token_id):
        """(text, bytes) of one token as the logprobs show it."""
        return token_text(self.tokenizer, token_id)

    def start(self, prompt_ids, params):
        """Submit a generation: raises InvalidParameter or ContextLengthExceeded (400), 429 when the
        queue is full, 503 while shutting down; nothing is queued unless it can run."""
        try:
            return self.batcher.submit(prompt_ids, params)
        except EngineFull as err:
            raise ApiError(429, f"the server is busy: {err}; retry shortly", code="rate_limit_exceeded",
                           type="rate_limit_error", headers={"Retry-After": "1"}) from None
        except EngineStopped as err:
            raise ApiError(503, str(err), code="server_shutting_down") from None

    def cancel(self, requests):
        for request in requests:
            request.cancel()

    def events(self, request, poll=None):
        """The request's events as the engine produces them; closing early cancels the request.

        With `poll` seconds, None is yielded whenever no event came for that long, so that the
        caller can do other work meanwhile (the WebSocket reads its client's messages)."""
        started, last, finished = time.perf_counter(), None, False
        try:
            while (event := request.get(timeout=poll)) is not DONE:
                if event is None:
                    yield None
                    continue
                now = time.perf_counter()
                if self.metrics:
                    self.metrics.token(now - (last or started), first=last is None)
                last = now
                yield event
            finished = True
        finally:
            if not finished:
                request.cancel()
                if self.metrics:
                    self.metrics.disconnects.inc()

    def score(self, ids, top):
        """Prompt log-probabilities (for echo): one full pass, outside the engine's batch."""
        return prompt_logprobs(self.model, self.tokenizer, ids, top)


class ModelState:
    """The engine once it is loaded; until then (or if loading failed) requests get 503."""

    def __init__(self, engine=None):
        self.engine, self.error, self.ready_callbacks = engine, None, []

    def on_ready(self, callback):
        """Call callback(engine) once the engine is loaded (now, if it already is)."""
        if self.engine is not None:
            callback(self.engine)
        else:
            self.ready_callbacks.append(callback)

    def load_in_background(self, load):
        """Start load() in a thread, so that the server answers /health while the weights are read."""
        def run():
            try:
                engine = load()
                for callback in self.ready_callbacks:
                    callback(engine)
                self.engine = engine  # requests see it only once it is complete
                log.info("model %s loaded", engine.model_id)
            except Exception as err:  # reported by /health and every request
                log.exception("loading the model failed")
                self.error = f"{type(err).__name__}: {err}"

        threading.Thread(target=run, name="load-model", daemon=True).start()
        return self

    def get(self):
        if self.engine is not None:
            return self.engine
        if self.error:
            raise ApiError(503, f"the model failed to load: {self.error}", code="model_load_failed")
        raise ApiError(503, "the model is still loading; try again shortly", code="model_not_ready")
