"""The same answer whatever else runs: two live servers on the default model, one idle, one under load.

A sampled chat completion (temperature 0.8, a seed, log-probabilities) and a prompt scoring request
(`echo` with log-probabilities) must come back JSON-identical, floats included: on a fresh server,
on a second fresh server (another process), and on that second server while 7 other streams run.
"""

import threading
import time

import pytest
import requests

from server_helpers import LiveServer

CHAT = {"messages": [{"role": "user", "content": "Tell me a short story about a lighthouse."}],
        "temperature": 0.8, "seed": 1234, "max_tokens": 24, "logprobs": True, "top_logprobs": 3}
SCORE = {"prompt": "The quick brown fox jumps over the lazy dog. " * 6, "echo": True, "logprobs": 3,
         "max_tokens": 2, "temperature": 0.8, "seed": 5}
LOAD_PROMPTS = ["Explain how a bicycle stays upright.", "Describe the water cycle.", "List uses of a paperclip.",
                "What makes a good cup of tea?", "Tell me about the history of maps.", "How do bees make honey?",
                "Why do cats purr?"]


@pytest.fixture(scope="module")
def servers(default_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("invariance")
    first = LiveServer(default_model_dir, log_path=tmp / "first.log")
    second = LiveServer(default_model_dir, log_path=tmp / "second.log")
    yield first, second
    first.stop()
    second.stop()


def answers(server):
    """The chat and the scoring response, without what differs per response (id, creation time)."""
    chat = requests.post(f"{server.base}/v1/chat/completions", json=CHAT, timeout=300)
    score = requests.post(f"{server.base}/v1/completions", json=SCORE, timeout=300)
    assert chat.status_code == 200 and score.status_code == 200, (chat.text, score.text)
    return [{k: v for k, v in r.json().items() if k not in ("id", "created", "usage")} | {
        "usage": {k: r.json()["usage"][k] for k in ("prompt_tokens", "completion_tokens")}} for r in (chat, score)]


def stream_until(server, prompt, stop, started):
    """A client that streams chat completions one after another until `stop` is set."""
    while not stop.is_set():
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 40, "stream": True,
                "temperature": 1.0}
        with requests.post(f"{server.base}/v1/chat/completions", json=body, stream=True, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith(b"data: {"):
                    started.set()


def test_the_same_json_alone_on_two_servers_and_under_load(servers):
    first, second = servers
    alone = answers(first)
    assert alone[0]["choices"][0]["logprobs"]["content"], "the chat answer carries log-probabilities"
    assert answers(second) == alone  # another process, the same bits

    stop = threading.Event()
    started = [threading.Event() for _ in LOAD_PROMPTS]
    clients = [threading.Thread(target=stream_until, args=(second, p, stop, s)) for p, s in zip(LOAD_PROMPTS, started)]
    for client in clients:
        client.start()
    try:
        for s in started:
            assert s.wait(timeout=300), "a load stream produced no token"
        for delay in (0.0, 0.7):  # land at different points of the other streams' steps
            time.sleep(delay)
            load = second.metric("refimpl_running_sequences") + second.metric("refimpl_waiting_requests")
            assert load >= 4, "the other streams are running"
            assert answers(second) == alone
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=300)
