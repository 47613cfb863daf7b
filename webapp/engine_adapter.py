"""The one place the server calls the engine: a model loaded once, shared by every request thread.

A forward pass mutates only its own request's KV cache, so overlapping requests are safe, but
two forward passes at once make NumPy's BLAS threads fight over a small machine's cores. So
each step of each generation (one next() on its event iterator) and each prompt scoring holds
one process-wide lock, handed to waiting threads in arrival order: overlapping requests
interleave step by step instead of one starving the other. The batching engine (issue 5)
replaces this module, and nothing else in webapp needs to change.
"""

import collections
import logging
import threading
from pathlib import Path

from refimpl.generate import default_stop_ids, generate, prompt_logprobs, token_text
from refimpl.model import load_model
from refimpl.tokenizer import Tokenizer

from webapp.errors import ApiError

log = logging.getLogger("refimpl.server")


class FairLock:
    """A mutex granted in the order it was asked for (threading.Lock lets the releaser barge back in)."""

    def __init__(self):
        self._mutex = threading.Lock()
        self._waiters = collections.deque()
        self._held = False

    def __enter__(self):
        with self._mutex:
            if not self._held:
                self._held = True
                return self
            turn = threading.Lock()
            turn.acquire()
            self._waiters.append(turn)
        turn.acquire()  # released by the holder before us: the lock is handed over, still held
        return self

    def __exit__(self, *exc):
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._held = False


class Engine:
    """A model, its tokenizer and stop ids, and the lock that serialises their use."""

    def __init__(self, model, tokenizer, stop_ids, model_id):
        self.model, self.tokenizer, self.stop_ids, self.model_id = model, tokenizer, set(stop_ids), model_id
        self.vocab_size = model.config.vocab_size
        self.lock = FairLock()

    @classmethod
    def load(cls, path, model_id=None, device="cpu"):
        model, tokenizer = load_model(path, device), Tokenizer.from_dir(path)
        return cls(model, tokenizer, default_stop_ids(tokenizer, model.config, path), model_id or Path(path).name)

    def chat_prompt(self, messages):
        return self.tokenizer.encode_chat(messages)

    def text_prompt(self, text):
        return self.tokenizer.encode(text)

    def decode(self, ids):
        return self.tokenizer.decode(ids)

    def piece(self, token_id):
        """(text, bytes) of one prompt token; special tokens are spelled out (<|im_start|>), as decode does."""
        if token_id in self.tokenizer.special_ids:
            text = self.tokenizer.decode([token_id])
            return text, list(text.encode("utf-8"))
        return token_text(self.tokenizer, token_id)

    def start(self, prompt_ids, params):
        """A generation, checked but not started: raises InvalidParameter or ContextLengthExceeded."""
        return generate(self.model, self.tokenizer, prompt_ids, params, self.stop_ids)

    def events(self, generation):
        """The generation's events, each step computed under the lock."""
        steps = iter(generation)
        while True:
            with self.lock:
                event = next(steps, None)
            if event is None:
                return
            yield event

    def score(self, ids, top):
        """Prompt log-probabilities (for echo), under the lock."""
        with self.lock:
            return prompt_logprobs(self.model, self.tokenizer, ids, top)


class ModelState:
    """The engine once it is loaded; until then (or if loading failed) requests get 503."""

    def __init__(self, engine=None):
        self.engine, self.error = engine, None

    def load_in_background(self, load):
        """Start load() in a thread, so that the server answers /health while the weights are read."""
        def run():
            try:
                self.engine = load()
                log.info("model %s loaded", self.engine.model_id)
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
