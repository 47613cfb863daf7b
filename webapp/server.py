"""Run the app: gunicorn by default (one process holding the model, a pool of threads), Flask's
development server with --dev.

gunicorn's gthread worker streams responses as they are written and hands WebSocket upgrades
to flask-sock. One worker process means one copy of the weights; its threads share them (see
engine_adapter for how their steps take turns). The worker timeout is off: a long generation or
a quiet stream is not a hung worker.

The model loads in a background thread of the worker, so /health answers 503 until it is ready.

SIGTERM drains: new requests get 503 at once, running generations finish (for at most
GRACE_SECONDS), then the worker and gunicorn exit with status 0.
"""

import logging
import threading
import time

from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker

from webapp.app import ServerConfig, create_app
from webapp.engine_adapter import Engine, ModelState

log = logging.getLogger("refimpl.server")

GRACE_SECONDS = 30


class DrainingWorker(ThreadWorker):
    """gunicorn's threaded worker, with a SIGTERM that lets running streams end before it stops.

    gunicorn's own graceful stop closes the listener at once: a new client would see a refused
    connection, not an answer. Here the worker keeps accepting while it drains, so that new
    requests get OpenAI's 503 envelope, and stops only when the engine is idle or time is up.
    """

    def handle_exit(self, sig, frame):
        refimpl = self.wsgi.extensions["refimpl"]
        if refimpl.draining:
            return
        refimpl.draining = True  # the app answers 503 from now on
        log.info("SIGTERM: refusing new requests, letting running ones finish (%d s at most)", GRACE_SECONDS)
        threading.Thread(target=self.drain, args=(refimpl.state,), name="drain", daemon=True).start()

    def drain(self, state):
        deadline = time.monotonic() + GRACE_SECONDS
        engine = state.engine
        if engine is not None:
            engine.batcher.stop_admitting()  # a request already past the app's check is refused too
        while engine is not None and not engine.batcher.idle() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # let the last events leave their queues
        ThreadWorker.handle_exit(self, None, None)


def make_app(model_path, model_id, device, config, max_seqs=16, max_queue=64):
    """The app, with the model loading in the background."""
    state = ModelState()
    app = create_app(state, config)
    state.load_in_background(lambda: Engine.load(model_path, model_id, device, max_seqs, max_queue))
    return app


class Gunicorn(BaseApplication):
    """gunicorn driven from Python: our options, our app (built in the worker, after the fork)."""

    def __init__(self, build_app, options):
        self.build_app, self.options = build_app, options
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        return self.build_app()


def serve(model_path, model_id, host="127.0.0.1", port=8080, api_key=None, cors_origins=(),
          max_body_bytes=1 << 20, threads=8, device="cpu", dev=False, max_seqs=16, max_queue=64):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(api_key=api_key, cors_origins=tuple(cors_origins), max_body_bytes=max_body_bytes)
    log.info("serving %s on http://%s:%d/v1 (docs: /docs)%s", model_id, host, port,
             "; API key required" if api_key else "")
    if dev:
        make_app(model_path, model_id, device, config, max_seqs, max_queue).run(host=host, port=port, threaded=True)
        return 0
    Gunicorn(lambda: make_app(model_path, model_id, device, config, max_seqs, max_queue), {
        "bind": f"{host}:{port}",
        "workers": 1,
        "worker_class": "webapp.server.DrainingWorker",
        "threads": threads,
        "timeout": 0,
        "graceful_timeout": GRACE_SECONDS + 5,
        "accesslog": None,  # our own line per request (app.py) instead
        "errorlog": "-",
        "loglevel": "info",
        "control_socket_disable": True,  # several servers on one machine would share its path
    }).run()
    return 0
