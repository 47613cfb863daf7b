"""Hostile and vanishing clients against live servers: what a client does cannot stall the server.

- A client that leaves is cancelled within about an engine step, whatever its request was doing:
  streaming, non-streaming, waiting in the queue, or streaming text held back for a stop string.
- Connections that stall (half a request line, a body that never comes, idle WebSockets) cost
  no thread: /health answers within a second and a chat completes while many are open, and
  each is closed after its time limit.
- The WebSocket refuses other sites' pages, oversized messages, and closes when the server drains.

The replies here run on endless_chat_model_dir (conftest.py): a reply there cannot end by itself
while a test runs, so nothing races the machine; each test waits on a condition with a deadline.
"""

import json
import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from server_helpers import LiveServer
from refimpl.tokenizer import Tokenizer

KEY = "sk-hardening"
ENDLESS = {"messages": "go on forever", "max_tokens": 100_000, "temperature": 0}


def wait_for(condition, seconds, what):
    """Poll `condition` until it holds; fail with `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {seconds} s: {what}")
        time.sleep(0.05)


def idle(server):
    return server.metric("refimpl_running_sequences") == 0 and server.metric("refimpl_waiting_requests") == 0


@pytest.fixture(scope="module")
def server(endless_chat_model_dir, tmp_path_factory):
    """Default bounds (16 sequences, 64 waiting), short time limits so that tests see them act."""
    live = LiveServer(endless_chat_model_dir, "--read-timeout", "2", "--ws-idle-timeout", "4",
                      "--ws-ping-interval", "1", log_path=tmp_path_factory.mktemp("hardening") / "server.log")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def small_server(endless_chat_model_dir, tmp_path_factory):
    """--max-seqs 2 --max-queue 2: what a 12-thread server used to be stalled by 12 connections."""
    live = LiveServer(endless_chat_model_dir, "--max-seqs", "2", "--max-queue", "2", "--read-timeout", "2",
                      log_path=tmp_path_factory.mktemp("hardening-small") / "server.log")
    yield live
    live.stop()


def raw_request(server, head, body=b""):
    """A socket that has sent `head` (and `body`) as they are, for requests no client library sends."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    s.sendall(head + body)
    return s


def post_head(path, body):
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def read_response(s):
    """(status line, JSON body) of one HTTP response read from a raw socket, however it is split."""
    s.settimeout(15)
    answer = b""
    while b"\r\n\r\n" not in answer:
        if not (chunk := s.recv(65536)):
            pytest.fail(f"the connection closed before a response: {answer!r}")
        answer += chunk
    head, body = answer.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?i)^content-length: (\d+)", head, re.M).group(1))
    while len(body) < length and (chunk := s.recv(65536)):
        body += chunk
    return head.split(b"\r\n", 1)[0], json.loads(body)


def first_data_line(response):
    return next(line for line in response.iter_lines() if line.startswith(b"data: "))


# ---------------------------------------------------------------- clients that vanish


def test_fifty_streams_closed_after_their_first_chunk_free_everything(server):
    """50 streams left after their first chunk: 16 were running, 34 waiting; all are let go."""
    def open_and_leave(_):
        with requests.post(f"{server.base}/v1/chat/completions", json={**ENDLESS, "stream": True}, stream=True,
                           timeout=60) as response:
            assert response.status_code == 200
            first_data_line(response)  # the role chunk: sent before any model work

    with ThreadPoolExecutor(50) as pool:
        list(pool.map(open_and_leave, range(50)))
    wait_for(lambda: idle(server), 2, "0 running and 0 waiting after the 50 clients left")
    started = time.monotonic()
    with requests.post(f"{server.base}/v1/chat/completions", json={**ENDLESS, "max_tokens": 3, "stream": True},
                       stream=True, timeout=30) as response:
        lines = [line for line in response.iter_lines() if line.startswith(b"data: ")]
    assert len(lines) >= 3 and lines[-1] == b"data: [DONE]"
    assert time.monotonic() - started < 5, "a new request waited behind the clients that left"


def test_a_non_streaming_client_that_leaves_stops_its_generation(server):
    s = raw_request(server, post_head("/v1/chat/completions", json.dumps(ENDLESS).encode()))
    wait_for(lambda: server.metric("refimpl_running_sequences") == 1, 10, "the request running")
    s.close()
    wait_for(lambda: idle(server), 2, "the generation stopped after its client left")
    tokens = server.metric("refimpl_generated_tokens_total")
    time.sleep(0.5)
    assert server.metric("refimpl_generated_tokens_total") == tokens  # nothing generates for nobody
    wait_for(lambda: "/v1/chat/completions 499" in server.log(), 5, "the request logged as 499")


def test_a_queued_client_that_leaves_is_dropped_from_the_queue(small_server):
    keep = [raw_request(small_server, post_head("/v1/chat/completions", json.dumps(ENDLESS).encode()))
            for _ in range(2)]
    wait_for(lambda: small_server.metric("refimpl_running_sequences") == 2, 10, "two requests running")
    queued = raw_request(small_server, post_head("/v1/chat/completions", json.dumps(ENDLESS).encode()))
    wait_for(lambda: small_server.metric("refimpl_waiting_requests") == 1, 10, "one request waiting")
    queued.close()
    wait_for(lambda: small_server.metric("refimpl_waiting_requests") == 0, 2, "the queue let go of it")
    assert small_server.metric("refimpl_running_sequences") == 2
    for s in keep:
        s.close()
    wait_for(lambda: idle(small_server), 2, "the running requests let go")


def test_a_stream_holding_back_text_for_a_stop_string_notices_its_client_left(server, endless_chat_model_dir):
    """Forced to write "a" forever against a stop string of 4000 a's and a b, the stream releases
    no text for 4000 tokens, so it never writes: it must notice the closed connection itself."""
    a = Tokenizer.from_dir(endless_chat_model_dir).encode("a")[0]
    body = {"prompt": "x", "max_tokens": 100_000, "temperature": 0, "stream": True, "logit_bias": {str(a): 100},
            "stop": "a" * 4000 + "b"}
    s = raw_request(server, post_head("/v1/completions", json.dumps(body).encode()))
    wait_for(lambda: server.metric("refimpl_running_sequences") == 1, 10, "the stream running")
    s.settimeout(0.5)
    with pytest.raises(TimeoutError):  # not a byte written: the headers go with the first text
        s.recv(65536)
    s.close()
    wait_for(lambda: idle(server), 2, "the held-back stream stopped after its client left")


# ---------------------------------------------------------------- clients that stall or flood


def health_within_one_second(server):
    started = time.monotonic()
    response = requests.get(f"{server.base}/health", timeout=5)
    assert response.status_code == 200
    assert time.monotonic() - started < 1, "/health was slow while connections stalled"


def quick_chat(server):
    response = requests.post(f"{server.base}/v1/chat/completions", json={**ENDLESS, "max_tokens": 3}, timeout=30)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3


def test_stalled_connections_do_not_stall_the_server(small_server):
    """24 of each kind of stalled connection (twice the 12 threads the old server had here)."""
    half_lines = [raw_request(small_server, b"POST /v1/chat/comp") for _ in range(24)]
    declared = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n")
    short_bodies = [raw_request(small_server, declared, b'{"messages"') for _ in range(24)]
    sockets = [connect(f"ws://127.0.0.1:{small_server.port}/v1/ws", legacy=True) for _ in range(24)]
    try:
        time.sleep(0.3)  # every connection has reached the server
        health_within_one_second(small_server)
        quick_chat(small_server)
        # A body that stops arriving is answered 408 after --read-timeout (2 s) of silence.
        status, body = read_response(short_bodies[0])
        assert status.startswith(b"HTTP/1.1 408") and body["error"]["code"] == "request_timeout"
        # Half a request line is closed once the time for the headers is up.
        half_lines[0].settimeout(15)
        assert half_lines[0].recv(65536) == b""
    finally:
        for s in half_lines + short_bodies:
            s.close()
        for ws in sockets:
            ws.close()


def test_unauthenticated_idle_websockets_do_not_stall_a_keyed_server(endless_chat_model_dir, tmp_path):
    live = LiveServer(endless_chat_model_dir, "--api-key", KEY, "--max-seqs", "2", "--max-queue", "2",
                      log_path=tmp_path / "server.log")
    try:
        sockets = [connect(f"ws://127.0.0.1:{live.port}/v1/ws", legacy=True) for _ in range(100)]
        assert json.loads(sockets[-1].recv(timeout=10))["auth_required"] is True
        health_within_one_second(live)
        response = requests.post(f"{live.base}/v1/chat/completions", json={**ENDLESS, "max_tokens": 3},
                                 headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert response.status_code == 200
        for ws in sockets:
            ws.close()
    finally:
        live.stop()


def test_an_idle_websocket_is_closed_after_the_idle_limit(server):
    with connect(f"ws://127.0.0.1:{server.port}/v1/ws") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=15)
    assert closed.value.rcvd.code == 1000 and "idle" in closed.value.rcvd.reason
    assert 3 < time.monotonic() - started < 10  # --ws-idle-timeout 4


def test_a_websocket_that_stops_answering_pings_is_closed(server):
    """A client that completes the handshake and then never reads nor answers (a dead peer)."""
    s = raw_request(server, (f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
                             "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                             "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    s.settimeout(10)
    started, received = time.monotonic(), b""
    while chunk := s.recv(65536):  # the 101, hello, pings; then the server closes (--ws-ping-interval 1)
        received += chunk
    assert received.startswith(b"HTTP/1.1 101")
    assert time.monotonic() - started < 6
    s.close()


def test_n_larger_than_max_seqs_is_a_400_not_a_batch_over_the_cap(small_server):
    response = requests.post(f"{small_server.base}/v1/chat/completions", json={**ENDLESS, "n": 3}, timeout=10)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "n" and "max_seqs" in error["message"]


def test_more_prompts_than_the_queue_holds_is_a_400_on_an_idle_server(small_server):
    for _ in range(3):  # a 429 would say "retry": this request can never succeed
        response = requests.post(f"{small_server.base}/v1/completions", json={"prompt": ["Hi", "Hi", "Hi"]},
                                 timeout=10)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "prompt" and "max_queue" in response.json()["error"]["message"]
    ok = requests.post(f"{small_server.base}/v1/completions", json={"prompt": ["Hi", "Hi"], "max_tokens": 2},
                       timeout=30)
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2


def test_over_long_stop_strings_are_refused_with_400(small_server):
    response = requests.post(f"{small_server.base}/v1/chat/completions",
                             json={**ENDLESS, "max_tokens": 2, "stop": ["x" * 3000, "y" * 3000]}, timeout=10)
    assert response.status_code == 400 and response.json()["error"]["param"] == "stop"
    assert "4096" in response.json()["error"]["message"]


# ---------------------------------------------------------------- bad bytes


@pytest.mark.parametrize("chunked", [b"zz\r\nabc\r\n0\r\n\r\n", b"2\r\nabcdef\r\n0\r\n\r\n"],
                         ids=["bad-size", "longer-than-its-size"])
def test_a_malformed_chunked_body_is_a_400_envelope(small_server, chunked):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    s = raw_request(small_server, head, chunked)
    status, body = read_response(s)
    s.close()
    assert status.startswith(b"HTTP/1.1 400") and body["error"]["code"] == "invalid_body"
    health_within_one_second(small_server)


# ---------------------------------------------------------------- the WebSocket


@pytest.mark.parametrize("origin, allowed", [
    ("http://evil.example", False),
    ("http://127.0.0.1:{port}", True),  # the server's own page
    ("http://trusted.example", True),  # allowed by --cors-origin
    (None, True),  # not a browser
])
def test_websocket_origin(cors_server, origin, allowed):
    live = cors_server
    headers = {} if origin is None else {"Origin": origin.format(port=live.port)}
    if allowed:
        with connect(f"ws://127.0.0.1:{live.port}/v1/ws", additional_headers=headers) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "hello"
    else:
        with pytest.raises(InvalidStatus) as refused:
            connect(f"ws://127.0.0.1:{live.port}/v1/ws", additional_headers=headers)
        assert refused.value.response.status_code == 403
        assert json.loads(refused.value.response.body)["error"]["code"] == "origin_not_allowed"


@pytest.fixture(scope="module")
def cors_server(endless_chat_model_dir, tmp_path_factory):
    live = LiveServer(endless_chat_model_dir, "--cors-origin", "http://trusted.example",
                      log_path=tmp_path_factory.mktemp("hardening-cors") / "server.log")
    yield live
    live.stop()


def test_an_oversized_websocket_message_closes_the_socket_unparsed(server):
    with connect(f"ws://127.0.0.1:{server.port}/v1/ws", max_size=None) as ws:
        json.loads(ws.recv(timeout=10))
        ws.send('{"type": "chat", "id": "big", "messages": "' + "x" * (2 << 20) + '"}')
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd.code == 1009  # message too big
    health_within_one_second(server)


@pytest.mark.parametrize("message", ['{"type": []}', '{"type": {"a": 1}}', '{"type": 7}'])
def test_a_type_that_is_not_a_string_is_a_400_event(server, message):
    with connect(f"ws://127.0.0.1:{server.port}/v1/ws") as ws:
        json.loads(ws.recv(timeout=10))
        ws.send(message)
        event = json.loads(ws.recv(timeout=10))
        assert event["type"] == "error" and event["status"] == 400 and event["error"]["param"] == "type"


def test_sigterm_with_an_idle_websocket_drains_at_once(endless_chat_model_dir, tmp_path):
    live = LiveServer(endless_chat_model_dir, log_path=tmp_path / "server.log")
    try:
        ws = connect(f"ws://127.0.0.1:{live.port}/v1/ws", legacy=True)  # the chat page left open in a tab
        json.loads(ws.recv(timeout=10))
        signalled = time.monotonic()
        live.process.send_signal(signal.SIGTERM)
        wait_for(lambda: requests.get(f"{live.base}/health", timeout=2).status_code == 503, 5, "503 while draining")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1001  # going away
        assert live.process.wait(timeout=15) == 0, live.log()
        assert time.monotonic() - signalled < 10
    finally:
        live.stop()
