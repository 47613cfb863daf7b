"""The web chat's WebSocket protocol (/v1/ws), with a real client against a live server (tiny model).

What the page relies on: a hello first; token events whose numbers come from the real sampler
(the same logprobs as the HTTP API, kept/filtered marks that agree with the settings); a done or
an error event ending every reply; cancel; the API-key rule; and bad messages answered with an
error event on a socket that keeps working. An inspect message is answered with the very response of
POST /v1/inspect for the same body (or its error envelope, under the message's id), refused with 409
while a reply streams on the socket and with 401 before the key.
"""

import json
import math
import re
import time
from contextlib import ExitStack

import pytest
import requests
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from conftest import NEAR_TIE, steps_before_a_near_tie
from server_helpers import LiveServer

KEY = "sk-webchat-test"
HELLO = [{"role": "user", "content": "hello there"}]
TOLERANCE = 1e-4  # max |Δ logprob| of one token computed by two code paths, as in test_model_golden.py


@pytest.fixture(scope="module")
def server(tiny_chat_model_dir, tmp_path_factory):
    live = LiveServer(tiny_chat_model_dir, log_path=tmp_path_factory.mktemp("webchat") / "server.log")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def endless_server(endless_chat_model_dir, tmp_path_factory):
    """Replies here never end by themselves: a test cancels one that is certainly still streaming."""
    live = LiveServer(endless_chat_model_dir, log_path=tmp_path_factory.mktemp("webchat-endless") / "server.log")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def keyed_server(tiny_chat_model_dir, tmp_path_factory):
    live = LiveServer(tiny_chat_model_dir, "--api-key", KEY,
                      log_path=tmp_path_factory.mktemp("webchat-key") / "server.log")
    yield live
    live.stop()


class Socket:
    """A WebSocket client speaking the protocol: JSON in, JSON out."""

    def __init__(self, server, headers=None):
        self.exit = ExitStack()
        self.ws = self.exit.enter_context(connect(f"ws://127.0.0.1:{server.port}/v1/ws", additional_headers=headers))
        self.hello = self.receive()

    def send(self, message):
        self.ws.send(message if isinstance(message, str) else json.dumps(message))

    def receive(self, timeout=60):
        return json.loads(self.ws.recv(timeout=timeout))

    def reply(self, reply_id, messages=HELLO, **settings):
        """Send a chat; return (token events, the done or error event that ended it)."""
        self.send({"type": "chat", "id": reply_id, "messages": messages, "settings": settings})
        return self.tokens_then_other(reply_id)

    def tokens_then_other(self, reply_id):
        """Receive reply_id's token events up to the first other event; return (tokens, that event)."""
        tokens = []
        while (event := self.receive())["type"] == "token":
            assert event["id"] == reply_id
            tokens.append(event)
        return tokens, event

    def close(self):
        self.exit.close()


@pytest.fixture
def socket(server):
    s = Socket(server)
    yield s
    s.close()


@pytest.fixture
def endless(endless_server):
    s = Socket(endless_server)
    yield s
    s.close()


def test_hello_comes_first(socket, tiny_chat_model_dir):
    assert socket.hello == {"type": "hello", "protocol": 1, "model": tiny_chat_model_dir.name, "auth_required": False}


def test_a_reply_streams_token_events_then_done(socket, server):
    tokens, done = socket.reply("r1", temperature=0, max_tokens=12)
    assert done["type"] == "done" and done["id"] == "r1"
    assert done["finish_reason"] in ("stop", "length")
    assert [t["index"] for t in tokens] == list(range(len(tokens))) and done["usage"]["completion_tokens"] == len(tokens)
    assert "".join(t["delta"] for t in tokens) == done["content"]
    # The same engine, template and limits as the HTTP API: the same greedy tokens, up to a near-tie
    # (the two replies may be computed differently: with a cached prompt prefix or without).
    body = {"messages": HELLO, "temperature": 0, "max_tokens": 12, "logprobs": True, "top_logprobs": 2}
    http = requests.post(f"{server.base}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
    content = http["logprobs"]["content"]
    agree = steps_before_a_near_tie([[top["logprob"] for top in entry["top_logprobs"]] for entry in content])
    assert [t["bytes"] for t in tokens[:agree]] == [entry["bytes"] for entry in content[:agree]]
    if agree == len(content):
        assert done["content"] == http["message"]["content"]


def test_token_numbers_are_the_model_logprobs(socket, server):
    """p, logprob, rank and the alternatives are what the HTTP API reports as logprobs, up to float32
    noise: the two replies may be computed differently (with a cached prompt prefix or without)."""
    tokens, done = socket.reply("r2", temperature=0, max_tokens=10)
    body = {"messages": HELLO, "temperature": 0, "max_tokens": 10, "logprobs": True, "top_logprobs": 10}
    content = requests.post(f"{server.base}/v1/chat/completions", json=body, timeout=60).json()[
        "choices"][0]["logprobs"]["content"]
    ordinary = [t for t in tokens if not t["special"]]  # a stop token has no logprobs entry
    agree = steps_before_a_near_tie([[top["logprob"] for top in entry["top_logprobs"]] for entry in content])
    assert agree > 0 and len(ordinary) >= agree
    if agree == len(content):
        assert len(ordinary) == len(content)
    for token, entry in zip(ordinary[:agree], content[:agree]):
        assert token["bytes"] == entry["bytes"]
        assert token["logprob"] == pytest.approx(entry["logprob"], abs=TOLERANCE)
        assert token["p"] == pytest.approx(math.exp(token["logprob"]), rel=1e-9)
        # The API's top 10 are among the alternatives, with their probabilities; only a token nearly
        # tied with the 10th may have traded places with the 11th.
        alternatives = {tuple(a["bytes"]): a["p"] for a in token["alternatives"]}
        tenth = entry["top_logprobs"][-1]["logprob"]
        for top in entry["top_logprobs"]:
            if tuple(top["bytes"]) in alternatives:
                assert math.log(alternatives[tuple(top["bytes"])]) == pytest.approx(top["logprob"], abs=TOLERANCE)
            else:
                assert top["logprob"] - tenth <= NEAR_TIE, (top, token["alternatives"])
        assert token["rank"] == 1  # greedy picks the most likely token


def check_distribution(token):
    alternatives = token["alternatives"]
    assert len(alternatives) >= 10
    ps = [a["p"] for a in alternatives[:10]]
    assert ps == sorted(ps, reverse=True)  # most likely first
    chosen = [a for a in alternatives if a["chosen"]]
    assert len(chosen) == 1 and chosen[0]["token_id"] == token["token_id"] and chosen[0]["p"] == token["p"]
    assert chosen[0]["kept"] and chosen[0]["removed_by"] is None  # the sampler only draws kept tokens
    assert sum(a["p"] for a in alternatives) + token["other_p"] == pytest.approx(1, abs=1e-9)
    assert sum(a["p_temp"] for a in alternatives) + token["other_p_temp"] == pytest.approx(1, abs=1e-9)
    for a in alternatives:
        assert a["kept"] == (a["removed_by"] is None)
        assert a["removed_by"] in (None, "temperature", "top_k", "top_p", "min_p")
    # rank: one more than the number of tokens the model found more likely
    assert token["rank"] == 1 + sum(a["p"] > token["p"] for a in alternatives) or token["rank"] > 10


def test_temperature_reshapes_the_sampled_distribution(socket):
    tokens, _ = socket.reply("r3", temperature=0.5, max_tokens=8, seed=1)
    for token in tokens:
        check_distribution(token)
        a, b = token["alternatives"][:2]
        # p_temp is proportional to p ** (1 / T): log-ratios double at T = 0.5.
        assert math.log(a["p_temp"] / b["p_temp"]) == pytest.approx(2 * math.log(a["p"] / b["p"]), abs=1e-6)


def test_greedy_keeps_only_the_most_likely_token(socket):
    tokens, _ = socket.reply("r4", temperature=0, max_tokens=6)
    for token in tokens:
        check_distribution(token)
        kept = [a for a in token["alternatives"] if a["kept"]]
        assert len(kept) == 1 and kept[0]["chosen"] and kept[0]["p_temp"] == 1
        assert {a["removed_by"] for a in token["alternatives"] if not a["kept"]} == {"temperature"}


def test_top_k_marks(socket):
    tokens, _ = socket.reply("r5", temperature=1.0, top_k=3, max_tokens=8, seed=2)
    for token in tokens:
        check_distribution(token)
        by_sampler = sorted(token["alternatives"], key=lambda a: -a["p_temp"])
        assert [a["kept"] for a in by_sampler] == [True] * 3 + [False] * (len(by_sampler) - 3)
        assert all(a["removed_by"] == "top_k" for a in by_sampler[3:])
        assert token["top_p_cut"] is None


def test_top_p_marks_and_cut(socket):
    tokens, _ = socket.reply("r6", temperature=1.0, top_p=0.3, max_tokens=8, seed=3)
    for token in tokens:
        check_distribution(token)
        cut = token["top_p_cut"]
        assert cut["top_p"] == 0.3 and 0.3 <= cut["mass"] <= 1
        by_sampler = sorted(token["alternatives"], key=lambda a: -a["p_temp"])
        kept = [a for a in by_sampler if a["kept"]]
        assert by_sampler[:len(kept)] == kept  # the kept set is the most likely prefix
        assert sum(a["p_temp"] for a in kept) == pytest.approx(cut["mass"], abs=1e-9)
        assert sum(a["p_temp"] for a in kept[:-1]) < 0.3  # the smallest such prefix
        assert all(a["removed_by"] == "top_p" for a in by_sampler[len(kept):])


def test_min_p_marks(socket):
    tokens, _ = socket.reply("r7", temperature=1.0, min_p=0.3, max_tokens=8, seed=4)
    for token in tokens:
        check_distribution(token)
        top = max(a["p_temp"] for a in token["alternatives"])
        for a in token["alternatives"]:
            assert a["kept"] == (a["p_temp"] >= 0.3 * top)
            assert a["removed_by"] in (None, "min_p")


def test_alternatives_count_and_offsets(socket):
    socket.send({"type": "chat", "id": "r8", "messages": HELLO, "settings": {"max_tokens": 20, "seed": 5},
                 "alternatives": 20})
    tokens = []
    while (event := socket.receive())["type"] == "token":
        tokens.append(event)
    content = event["content"]
    released = 0
    for token in tokens:
        assert len(token["alternatives"]) in (20, 21)  # 20, and the chosen token if it is not among them
        # A token starts where the text released so far ends, or inside a character still pending there.
        assert token["offset"] >= released - 1 and token["offset"] <= len(content)
        released += len(token["delta"])
    offsets = [t["offset"] for t in tokens]
    assert offsets == sorted(offsets) and offsets[0] == 0
    for token in tokens:  # a token holding whole characters is found at its offset
        if token["delta"] == token["text"] and "\ufffd" not in token["text"]:
            assert content[token["offset"]:token["offset"] + len(token["text"])] == token["text"]


def test_offsets_group_the_bytes_of_one_character():
    """Real-model style: a character split over tokens shares one offset (generate's TextStream)."""
    from refimpl.generate import TextStream

    stream, offsets = TextStream(), []
    for piece in [b"a", "é".encode()[:1], "é".encode()[1:], b" ", "😀".encode()[:2], "😀".encode()[2:], b"!"]:
        offsets.append(len(stream.text))
        stream.push(piece)
    assert offsets == [0, 1, 1, 2, 3, 3, 4] and stream.text == "aé 😀!"


@pytest.mark.parametrize("message, param, code", [
    ("not json", None, "invalid_json"),
    ("[1, 2]", "type", "invalid_value"),
    ({"type": "shout"}, "type", "invalid_value"),
    ({"type": "chat", "messages": HELLO}, "id", "invalid_value"),
    ({"type": "chat", "id": "", "messages": HELLO}, "id", "invalid_value"),
    ({"type": "chat", "id": "x", "messages": []}, "messages", "invalid_value"),
    ({"type": "chat", "id": "x", "messages": [{"role": "wizard", "content": "hi"}]}, None, "invalid_value"),
    ({"type": "chat", "id": "x", "messages": HELLO, "settings": {"temperature": 3}}, "temperature", "invalid_value"),
    ({"type": "chat", "id": "x", "messages": HELLO, "settings": {"top_p": "high"}}, "top_p", "invalid_value"),
    ({"type": "chat", "id": "x", "messages": HELLO, "settings": {"top_k": 2.5}}, "top_k", "invalid_value"),
    ({"type": "chat", "id": "x", "messages": HELLO, "settings": {"max_tokens": 0}}, "max_tokens", "invalid_value"),
    ({"type": "chat", "id": "x", "messages": HELLO, "settings": {"seed": -1}}, "seed", "invalid_value"),
    ({"type": "chat", "id": "x", "messages": HELLO, "settings": {"n": 2}}, None, "invalid_value"),
    ({"type": "chat", "id": "x", "messages": HELLO, "alternatives": 5}, "alternatives", "invalid_value"),
    ({"type": "chat", "id": "x", "messages": HELLO, "extra": 1}, None, "invalid_value"),
    ({"type": "chat", "id": "x", "messages": [{"role": "user", "content": "a " * 3000}]}, "messages",
     "context_length_exceeded"),
    ({"type": "cancel"}, "id", "invalid_value"),
    ({"type": "auth"}, "api_key", "invalid_value"),
])
def test_bad_messages_get_an_error_event_and_the_socket_goes_on(socket, message, param, code):
    socket.send(message)
    error = socket.receive()
    assert error["type"] == "error" and error["status"] == 400, error
    assert error["error"]["code"] == code and error["error"]["message"]
    if param is not None:
        assert error["error"]["param"] == param or error["error"]["param"].startswith(param), error
    if isinstance(message, dict) and message.get("id"):
        assert error["id"] == message["id"]
    tokens, done = socket.reply("after", temperature=0, max_tokens=2)
    assert done["type"] == "done" and tokens


def running_sequences(server):
    text = requests.get(f"{server.base}/metrics", timeout=5).text
    return float(re.search(r"^refimpl_running_sequences (\S+)$", text, re.M).group(1))


def test_cancel_ends_the_reply_and_frees_the_engine(endless, endless_server):
    endless.send({"type": "chat", "id": "long", "messages": HELLO, "settings": {"seed": 1}})
    tokens = [endless.receive() for _ in range(3)]
    assert all(t["type"] == "token" for t in tokens)
    endless.send({"type": "cancel", "id": "long"})
    more, done = endless.tokens_then_other("long")
    assert done["type"] == "done" and done["id"] == "long" and done["finish_reason"] == "canceled"
    assert done["usage"]["completion_tokens"] >= len(tokens + more)
    assert running_sequences(endless_server) == 0
    # This reply's log line, by the request id its done event names.
    usage = done["usage"]
    line = re.compile(rf"{done['request_id']} WS /v1/ws chat 200 prompt={usage['prompt_tokens']} "
                      rf"completion={usage['completion_tokens']} [0-9.]+s \(finish_reason canceled\)$", re.M)
    deadline = time.monotonic() + 30
    while not line.search(endless_server.log()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert line.search(endless_server.log()), endless_server.log()


def test_one_reply_at_a_time(endless):
    endless.send({"type": "chat", "id": "first", "messages": HELLO, "settings": {"seed": 1}})
    assert endless.receive()["type"] == "token"
    endless.send({"type": "chat", "id": "second", "messages": HELLO})
    endless.send({"type": "cancel", "id": "not-running"})  # harmless: nothing by that id runs
    endless.send({"type": "chat", "id": "third", "messages": HELLO})  # refused after that cancel was read
    for refused_id in ("second", "third"):
        _, refused = endless.tokens_then_other("first")
        assert refused["type"] == "error" and refused["id"] == refused_id and refused["status"] == 409
        assert refused["error"]["code"] == "request_in_progress"
    going_on = endless.receive()  # "first" was not canceled by the cancel for another id
    assert going_on["type"] == "token" and going_on["id"] == "first"
    endless.send({"type": "cancel", "id": "first"})
    _, done = endless.tokens_then_other("first")
    assert done["type"] == "done" and done["id"] == "first" and done["finish_reason"] == "canceled"


def test_a_vanished_client_frees_its_sequence(endless_server):
    s = Socket(endless_server)
    s.send({"type": "chat", "id": "gone", "messages": HELLO, "settings": {"seed": 1}})
    assert s.receive()["type"] == "token"
    assert running_sequences(endless_server) == 1
    s.close()
    deadline = time.monotonic() + 30
    while running_sequences(endless_server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running_sequences(endless_server) == 0


def test_the_key_is_asked_for_in_the_socket(keyed_server):
    s = Socket(keyed_server)  # a browser: no Authorization header
    try:
        assert s.hello["auth_required"] is True
        _, refused = s.reply("r1", max_tokens=2)
        assert refused["type"] == "error" and refused["status"] == 401 and refused["id"] == "r1"
        s.send({"type": "auth", "api_key": "wrong"})
        wrong = s.receive()
        assert wrong["status"] == 401 and wrong["error"]["code"] == "invalid_api_key"
        _, still_refused = s.reply("r2", max_tokens=2)
        assert still_refused["status"] == 401
        s.send({"type": "auth", "api_key": KEY})
        tokens, done = s.reply("r3", max_tokens=2)
        assert done["type"] == "done" and tokens
    finally:
        s.close()


def test_the_key_in_the_handshake(keyed_server):
    s = Socket(keyed_server, headers={"Authorization": f"Bearer {KEY}"})
    try:
        assert s.hello["auth_required"] is False
        assert s.reply("r1", max_tokens=2)[1]["type"] == "done"
    finally:
        s.close()
    with pytest.raises(InvalidStatus) as err:
        Socket(keyed_server, headers={"Authorization": "Bearer wrong"})
    assert err.value.response.status_code == 401


def test_the_page_is_served_locally_and_needs_no_key(keyed_server):
    page = requests.get(f"{keyed_server.base}/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and not re.search(r"https?://", page.text)
    for asset in assets:
        assert asset.startswith("/") and not asset.startswith("//"), asset
        response = requests.get(keyed_server.base + asset, timeout=10)
        assert response.status_code == 200, asset
        assert not re.search(r"https?://(?!localhost|127\.0\.0\.1)", response.text), f"{asset} reaches out"


# ---------------------------------------------------------------- inspect: POST /v1/inspect over the socket

INSPECT_BODIES = [
    {"messages": HELLO, "add_generation_prompt": True},  # what the page asks before each reply
    {"messages": [{"role": "system", "content": "Be brief."}, *HELLO], "positions": [2, 5],
     "logit_lens": {"top": 3}, "attention": {"layers": [0, 2], "heads": "all"}},
    {"prompt": [1, 87, 85, 267, 201, 42], "positions": [4], "logit_lens": {"top": 5},  # a reply token's tabs
     "attention": {"layers": "all", "heads": "all"}},
    {"prompt": "hello there", "logit_lens": {"top": 2}},
]


def http_inspect(server, body):
    return requests.post(f"{server.base}/v1/inspect", json=body, timeout=60)


@pytest.mark.parametrize("body", INSPECT_BODIES)
def test_inspect_is_answered_with_the_http_inspection(socket, server, body):
    socket.send({"type": "inspect", "id": "i1", "request": body})
    event = socket.receive()
    assert event["type"] == "inspection" and event["id"] == "i1" and set(event) == {"type", "id", "inspection"}, event
    http = http_inspect(server, body)
    assert http.status_code == 200, http.text
    assert event["inspection"] == http.json()  # the same forward pass, bit for bit


@pytest.mark.parametrize("body, param", [
    ({}, "prompt"),  # neither prompt nor messages
    ({"prompt": "hi", "messages": HELLO}, "prompt"),
    ({"prompt": "hi", "positions": [99]}, "positions"),
    ({"prompt": "hi", "logit_lens": {"top": 0}}, "logit_lens"),
    ({"messages": HELLO, "attention": {"layers": [7], "heads": "all"}}, "attention"),
    ({"prompt": [100000]}, "prompt"),
    ({"prompt": [5] * 1100}, "prompt"),  # over the 1024-token limit: 400 saying how to narrow it
])
def test_a_bad_inspect_body_gets_an_error_event_with_its_id(socket, server, body, param):
    socket.send({"type": "inspect", "id": "bad", "request": body})
    error = socket.receive()
    assert error["type"] == "error" and error["id"] == "bad" and error["status"] == 400, error
    http = http_inspect(server, body)
    assert http.status_code == 400
    assert error["error"] == http.json()["error"], "the socket's envelope differs from the HTTP API's"
    if param is not None:
        assert error["error"]["param"].startswith(param), error
    socket.send({"type": "inspect", "id": "good", "request": {"prompt": "hi"}})  # the socket goes on
    assert socket.receive()["type"] == "inspection"


@pytest.mark.parametrize("message, param", [
    ({"type": "inspect", "request": {"prompt": "hi"}}, "id"),
    ({"type": "inspect", "id": "x"}, "request"),
    ({"type": "inspect", "id": "x", "request": "hi"}, "request"),
])
def test_a_malformed_inspect_message_gets_an_error_event(socket, message, param):
    socket.send(message)
    error = socket.receive()
    assert error["type"] == "error" and error["status"] == 400 and error["error"]["param"] == param, error
    assert error["id"] == message.get("id")


def test_inspect_while_a_reply_streams_is_refused_with_409(endless):
    endless.send({"type": "chat", "id": "long", "messages": HELLO, "settings": {"seed": 1}})
    assert endless.receive()["type"] == "token"
    endless.send({"type": "inspect", "id": "i-busy", "request": {"prompt": "hi"}})
    _, refused = endless.tokens_then_other("long")
    assert refused["type"] == "error" and refused["id"] == "i-busy" and refused["status"] == 409, refused
    assert refused["error"]["code"] == "request_in_progress"
    going_on = endless.receive()  # the reply was not disturbed
    assert going_on["type"] == "token" and going_on["id"] == "long"
    endless.send({"type": "cancel", "id": "long"})
    _, done = endless.tokens_then_other("long")
    assert done["type"] == "done" and done["finish_reason"] == "canceled"
    endless.send({"type": "inspect", "id": "i-after", "request": {"prompt": "hi"}})  # once it ended: answered
    answer = endless.receive()
    assert answer["type"] == "inspection" and answer["id"] == "i-after"


def test_inspect_needs_the_key(keyed_server):
    s = Socket(keyed_server)
    try:
        s.send({"type": "inspect", "id": "i1", "request": {"prompt": "hi"}})
        refused = s.receive()
        assert refused["type"] == "error" and refused["id"] == "i1" and refused["status"] == 401, refused
        assert refused["error"]["code"] == "invalid_api_key"
        s.send({"type": "auth", "api_key": KEY})
        s.send({"type": "inspect", "id": "i2", "request": {"prompt": "hi"}})
        answer = s.receive()
        assert answer["type"] == "inspection" and answer["id"] == "i2"
    finally:
        s.close()
