"""GET /metrics: the server's state in Prometheus' text format (prometheus_client).

refimpl_requests_total{status}             requests answered, by HTTP status
refimpl_running_sequences                  sequences in the engine's batch now
refimpl_waiting_requests                   requests queued for a place in the batch
refimpl_generated_tokens_total             tokens sampled by the engine
refimpl_time_to_first_token_seconds        from the start of streaming to the first event
refimpl_inter_token_latency_seconds        between consecutive events of one request
refimpl_client_disconnects_total           requests whose client went away before the end

Each app has its own registry, so two apps in one process (as in the tests) do not collide.
"""

from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

bp = Blueprint("metrics", __name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class EngineCollector:
    """Read the engine's live numbers at scrape time (nothing to keep in sync)."""

    def __init__(self, state):
        self.state = state

    def collect(self):
        engine = self.state.engine
        if engine is None:  # still loading
            return
        yield GaugeMetricFamily("refimpl_running_sequences", "Sequences in the engine's batch",
                                value=engine.running_sequences)
        yield GaugeMetricFamily("refimpl_waiting_requests", "Requests waiting for a place in the batch",
                                value=engine.waiting_requests)
        yield CounterMetricFamily("refimpl_generated_tokens", "Tokens sampled by the engine",
                                  value=engine.stats["tokens_generated"])


class Metrics:
    def __init__(self, state):
        self.registry = CollectorRegistry()
        self.requests = Counter("refimpl_requests", "Requests answered, by HTTP status", ["status"],
                                registry=self.registry)
        self.ttft = Histogram("refimpl_time_to_first_token_seconds", "Time to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("refimpl_inter_token_latency_seconds", "Time between consecutive tokens",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.disconnects = Counter("refimpl_client_disconnects", "Requests whose client left before the end",
                                   registry=self.registry)
        self.registry.register(EngineCollector(state))

    def token(self, seconds, first):
        (self.ttft if first else self.itl).observe(seconds)


@bp.route("/metrics", methods=["GET"])
def metrics():
    registry = current_app.extensions["refimpl"].metrics.registry
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
