"""Many clients against one live server on a tiny model: overload, disconnects, health, metrics.

The server runs the real batching engine with small bounds (--max-seqs 2 --max-queue 2), so that
a handful of clients is already "too many". Its model has no end-of-sequence token and a context
of a million positions (conftest.endless_chat_model_dir): a reply without max_tokens holds its
place until its client leaves, so a test saturates the server for certain instead of racing it.
"""

import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest
import requests

from conftest import ENDLESS_CONTEXT
from server_helpers import LiveServer

MAX_SEQS, MAX_QUEUE = 2, 2


@pytest.fixture(scope="module")
def server(endless_chat_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("load")
    live = LiveServer(endless_chat_model_dir, "--max-seqs", str(MAX_SEQS), "--max-queue", str(MAX_QUEUE),
                      log_path=tmp / "server.log")
    yield live
    live.stop()


def chat(server, stream=False, max_tokens=40, timeout=60):
    """A greedy chat reply; max_tokens=None: one that never ends by itself."""
    body = {"messages": "tell me everything", "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    return requests.post(f"{server.base}/v1/chat/completions", json=body, stream=stream, timeout=timeout)


def metric(server, name):
    text = requests.get(f"{server.base}/metrics", timeout=5).text
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics:\n{text}"
    return float(match.group(1))


def wait_for_engine(server, running, waiting, timeout=30):
    """Poll /metrics until the engine runs `running` sequences and queues `waiting` requests."""
    deadline = time.monotonic() + timeout
    while (now := (metric(server, "refimpl_running_sequences"), metric(server, "refimpl_waiting_requests"))) \
            != (running, waiting):
        assert time.monotonic() < deadline, f"(running, waiting) is {now} after {timeout} s, not {(running, waiting)}"
        time.sleep(0.05)


def saturate(server, stack):
    """Take every sequence, then every queue place, with replies that never end (closed when stack closes)."""
    for count, running, waiting in [(MAX_SEQS, MAX_SEQS, 0), (MAX_QUEUE, MAX_SEQS, MAX_QUEUE)]:
        held = [stack.enter_context(chat(server, stream=True, max_tokens=None)) for _ in range(count)]
        assert [r.status_code for r in held] == [200] * count
        wait_for_engine(server, running, waiting)  # running (then queued) before the next ones come


def test_overload_gets_200_or_429_never_a_hang(server):
    clients = 2 * (MAX_SEQS + MAX_QUEUE)
    with ExitStack() as stack:
        saturate(server, stack)  # these four were answered 200 and stream
        with ThreadPoolExecutor(clients) as pool:
            responses = list(pool.map(lambda _: chat(server, max_tokens=60), range(clients)))
    statuses = [r.status_code for r in responses]
    assert statuses == [429] * clients, statuses  # at once, not after waiting for a place
    refused = responses[0]
    assert refused.headers["Retry-After"] == "1"
    assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    wait_for_engine(server, 0, 0)  # the held replies' clients left
    assert chat(server, max_tokens=3).status_code == 200  # and it goes on serving


def test_streams_closed_early_free_their_sequences(server):
    for _ in range(100):
        with chat(server, stream=True, max_tokens=400) as response:
            if response.status_code == 200:
                next(line for line in response.iter_lines() if line.startswith(b"data: "))
    wait_for_engine(server, 0, 0)
    assert metric(server, "refimpl_client_disconnects_total") > 0
    with chat(server, stream=True, max_tokens=5) as response:  # served, not refused: nothing holds a place
        assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")


def test_a_closed_stream_cancels_every_prompt_of_a_completion(server):
    max_tokens = ENDLESS_CONTEXT - 16  # minutes of work: only a cancel ends these within the test
    body = {"prompt": ["one", "two"], "max_tokens": max_tokens, "temperature": 0, "stream": True}
    generated = metric(server, "refimpl_generated_tokens_total")
    with requests.post(f"{server.base}/v1/completions", json=body, stream=True, timeout=60) as response:
        assert response.status_code == 200
        next(line for line in response.iter_lines() if line.startswith(b"data: "))
    wait_for_engine(server, 0, 0)
    # Neither prompt ran on to its max_tokens for nobody (the second never even streamed).
    assert metric(server, "refimpl_generated_tokens_total") - generated < max_tokens


def test_health_answers_while_generation_is_saturated(server):
    """Health never waits for generation: with every place held by a reply that cannot end, it answers."""
    with ExitStack() as stack:
        saturate(server, stack)
        for _ in range(10):
            assert requests.get(f"{server.base}/health", timeout=10).status_code == 200
        assert metric(server, "refimpl_running_sequences") == MAX_SEQS  # still saturated throughout
    wait_for_engine(server, 0, 0)


def test_metrics_in_prometheus_format(server):
    assert chat(server, max_tokens=4).status_code == 200
    response = requests.get(f"{server.base}/metrics", timeout=5)
    assert response.headers["Content-Type"].startswith("text/plain")
    assert metric(server, 'refimpl_requests_total{status="200"}') >= 1
    assert metric(server, "refimpl_generated_tokens_total") >= 4
    assert metric(server, "refimpl_waiting_requests") >= 0
    assert metric(server, "refimpl_time_to_first_token_seconds_count") >= 1
    assert metric(server, "refimpl_inter_token_latency_seconds_count") >= 3
