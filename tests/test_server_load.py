"""Many clients against one live server on a tiny model: overload, disconnects, health, metrics.

The server runs the real batching engine with small bounds (--max-seqs 2 --max-queue 2), so that
a handful of clients is already "too many".
"""

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from server_helpers import LiveServer, tiny_model_dir

MAX_SEQS, MAX_QUEUE = 2, 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("load")
    live = LiveServer(tiny_model_dir(tmp / "tiny"), "--max-seqs", str(MAX_SEQS), "--max-queue", str(MAX_QUEUE),
                      log_path=tmp / "server.log")
    yield live
    live.stop()


def chat(server, stream=False, max_tokens=40, timeout=60):
    body = {"messages": "tell me everything", "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    return requests.post(f"{server.base}/v1/chat/completions", json=body, stream=stream, timeout=timeout)


def metric(server, name):
    text = requests.get(f"{server.base}/metrics", timeout=5).text
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics:\n{text}"
    return float(match.group(1))


def test_overload_gets_200_or_429_never_a_hang(server):
    clients = 4 * (MAX_SEQS + MAX_QUEUE)
    with ThreadPoolExecutor(clients) as pool:
        responses = list(pool.map(lambda _: chat(server, max_tokens=60), range(clients)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert 200 in statuses and 429 in statuses, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["Retry-After"] == "1"
    assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert chat(server, max_tokens=3).status_code == 200  # and it goes on serving


def test_streams_closed_early_free_their_sequences(server):
    for _ in range(100):
        with chat(server, stream=True, max_tokens=400) as response:
            if response.status_code == 200:
                next(line for line in response.iter_lines() if line.startswith(b"data: "))
    deadline = time.monotonic() + 2
    while metric(server, "refimpl_running_sequences") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "refimpl_running_sequences") == 0
    assert metric(server, "refimpl_client_disconnects_total") > 0
    start = time.monotonic()
    with chat(server, stream=True, max_tokens=5) as response:
        next(line for line in response.iter_lines() if line.startswith(b"data: "))
    assert time.monotonic() - start < 5


def test_a_closed_stream_cancels_every_prompt_of_a_completion(server):
    body = {"prompt": ["one", "two"], "max_tokens": 400, "temperature": 0, "stream": True}
    generated = metric(server, "refimpl_generated_tokens_total")
    with requests.post(f"{server.base}/v1/completions", json=body, stream=True, timeout=60) as response:
        assert response.status_code == 200
        next(line for line in response.iter_lines() if line.startswith(b"data: "))
    deadline = time.monotonic() + 2
    while metric(server, "refimpl_running_sequences") + metric(server, "refimpl_waiting_requests") \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "refimpl_running_sequences") == metric(server, "refimpl_waiting_requests") == 0
    # Neither prompt ran on to its 400 tokens for nobody (the second never even streamed).
    assert metric(server, "refimpl_generated_tokens_total") - generated < 400


def test_health_answers_quickly_while_generation_is_saturated(server):
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            chat(server, max_tokens=450)

    workers = [threading.Thread(target=busy) for _ in range(MAX_SEQS + MAX_QUEUE)]
    for w in workers:
        w.start()
    try:
        time.sleep(0.5)
        latencies, running = [], []
        for _ in range(10):
            start = time.perf_counter()
            assert requests.get(f"{server.base}/health", timeout=5).status_code == 200
            latencies.append(time.perf_counter() - start)
            running.append(metric(server, "refimpl_running_sequences"))
        assert sum(r > 0 for r in running) >= 8, f"generation was not saturated: {running}"
        assert max(latencies) < 0.1, latencies
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=30)


def test_metrics_in_prometheus_format(server):
    assert chat(server, max_tokens=4).status_code == 200
    response = requests.get(f"{server.base}/metrics", timeout=5)
    assert response.headers["Content-Type"].startswith("text/plain")
    assert metric(server, 'refimpl_requests_total{status="200"}') >= 1
    assert metric(server, "refimpl_generated_tokens_total") >= 4
    assert metric(server, "refimpl_waiting_requests") >= 0
    assert metric(server, "refimpl_time_to_first_token_seconds_count") >= 1
    assert metric(server, "refimpl_inter_token_latency_seconds_count") >= 3
