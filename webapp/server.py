"""Run the app: gunicorn with its gevent worker by default, Flask's development server with --dev.

Why gevent: a server that gives each connection a thread can be stalled by holding connections
open. Twelve clients that send half a request line, declare a body and never send it, or open
a WebSocket and say nothing, would take all twelve threads, and /health would not answer. Here
every connection is a greenlet: an idle or slow one costs a few kilobytes, not a thread, so
thousands can wait while the server goes on answering (gunicorn's worker_connections, 1000 by
default, bounds them). And time bounds them too:
- the request line and headers must arrive within KEEPALIVE_SECONDS (gunicorn's keepalive),
  which is also how long an idle keep-alive connection is kept;
- after that, a connection silent for read_timeout_s while the server reads its body or writes
  its response is closed (a half-sent body gets 408; a client that stops reading is dropped);
- WebSockets are pinged and closed when they stop answering or stay idle (webchat.py).

The model runs in the batching engine's own greenlet, and each forward pass is offloaded to a
real thread (gevent's thread pool), so the event loop goes on serving connections while the
weights are read. One worker process means one copy of the weights. The worker timeout is off:
a long generation or a quiet stream is not a hung worker.

The model loads in the background, so /health answers 503 until it is ready.

SIGTERM drains: new requests get 503 at once, idle WebSockets are closed, running generations
finish (for at most GRACE_SECONDS), then the worker and gunicorn exit with status 0.
"""

import logging
import time

import gevent
from gunicorn.app.base import BaseApplication
from gunicorn.workers.ggevent import GeventWorker

from webapp.app import ServerConfig, create_app
from webapp.serving import ModelState, open_engine

log = logging.getLogger("refimpl.server")

GRACE_SECONDS = 30
KEEPALIVE_SECONDS = 5


def in_thread_pool(f, *args):
    """Run f(*args) in a real thread of gevent's pool; this greenlet waits, the others go on."""
    return gevent.get_hub().threadpool.apply(f, args)


class Worker(GeventWorker):
    """gunicorn's gevent worker with a read timeout on every connection and a draining SIGTERM.

    gunicorn's own graceful stop closes the listener at once: a new client would see a refused
    connection, not an answer. Here the worker keeps accepting while it drains, so that new
    requests get OpenAI's 503 envelope, and stops only when the engine is idle or time is up.
    """

    def handle(self, listener, client, addr):
        # GeventWorker.handle makes the socket blocking without a timeout; this one times out
        # (cooperatively, in gevent) when the client is silent for read_timeout_s.
        client.settimeout(self.wsgi.extensions["refimpl"].config.read_timeout_s)
        super(GeventWorker, self).handle(listener, client, addr)

    def handle_exit(self, sig, frame):
        refimpl = self.wsgi.extensions["refimpl"]
        if refimpl.draining:
            return
        refimpl.draining = True  # the app answers 503 from now on; idle WebSockets close
        log.info("SIGTERM: refusing new requests, letting running ones finish (%d s at most)", GRACE_SECONDS)
        gevent.spawn(self.drain, refimpl.state)  # a signal handler must not block

    def drain(self, state):
        deadline = time.monotonic() + GRACE_SECONDS
        engine = state.engine
        if engine is not None:
            engine.stop_admitting()  # a request already past the app's check is refused too
        while engine is not None and not engine.idle() and time.monotonic() < deadline:
            gevent.sleep(0.05)
        gevent.sleep(0.2)  # let the last events leave their queues
        self.alive = False  # GeventWorker.run: stop accepting, wait for open connections, exit


def make_app(model_path, model_id, device, config, max_seqs=16, max_queue=64, offload=None):
    """The app, with the model loading in the background."""
    state = ModelState().load_in_background(
        lambda: open_engine(model_path, device, offload, max_seqs=max_seqs, max_queue=max_queue), model_id)
    return create_app(state, config)


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


def serve(model_path, model_id, host="127.0.0.1", port=8080, device="cpu", dev=False, max_seqs=16, max_queue=64,
          max_connections=1000, **config):
    """Serve until SIGTERM or Ctrl-C; `config` holds ServerConfig's fields (api_key, cors_origins, ...)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(**config)
    log.info("serving %s on http://%s:%d/v1 (docs: /docs)%s", model_id, host, port,
             "; API key required" if config.api_key else "")
    if dev:
        make_app(model_path, model_id, device, config, max_seqs, max_queue).run(host=host, port=port, threaded=True)
        return 0
    Gunicorn(lambda: make_app(model_path, model_id, device, config, max_seqs, max_queue, in_thread_pool), {
        "bind": f"{host}:{port}",
        "workers": 1,
        "worker_class": "webapp.server.Worker",
        "worker_connections": max_connections,
        "keepalive": KEEPALIVE_SECONDS,
        "timeout": 0,
        # gunicorn's master kills a worker this long after it passed on SIGTERM: the drain (GRACE_SECONDS)
        # must fit in it, or running streams are cut (at 15 tokens/s, an 80-token stream needs 5 s).
        "graceful_timeout": GRACE_SECONDS + 5,
        "accesslog": None,  # our own line per request (app.py) instead
        "errorlog": "-",
        "loglevel": "info",
        "control_socket_disable": True,  # several servers on one machine would share its path
    }).run()
    return 0
