"""SIGTERM: new requests get 503 at once, a running stream finishes, the server exits with status 0."""

import json
import signal
import threading
import time

import requests

from server_helpers import LiveServer


def test_sigterm_drains_running_streams_and_exits_cleanly(default_model_dir, tmp_path):
    server = LiveServer(default_model_dir, log_path=tmp_path / "server.log")
    lines, started = [], threading.Event()

    def stream():
        # The end of sequence banned: the stream runs to its 80 tokens, seconds of decoding.
        body = {"prompt": "The history of the lighthouse begins", "max_tokens": 80, "temperature": 0, "stream": True,
                "logit_bias": {"2": -100}}
        with requests.post(f"{server.base}/v1/completions", json=body, stream=True, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith(b"data: "):
                    lines.append(line[len(b"data: "):])
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        assert started.wait(60), server.log()
        server.process.send_signal(signal.SIGTERM)
        # gunicorn's master passes the signal on to the worker: within moments, new work is refused.
        deadline = time.monotonic() + 30
        while True:
            refused = requests.post(f"{server.base}/v1/chat/completions", json={"messages": "hi", "max_tokens": 1},
                                    timeout=10)
            if refused.status_code != 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert refused.status_code == 503
        assert reader.is_alive()  # refused while the running stream still streams
        assert refused.json()["error"]["code"] == "server_shutting_down"
        reader.join(timeout=60)
        assert lines[-1] == b"[DONE]", server.log()
        finishes = [c["finish_reason"] for line in lines[:-1] for c in json.loads(line)["choices"] if c["finish_reason"]]
        assert finishes == ["length"]  # the running stream ran to its 80 tokens, not cut short
        assert server.process.wait(timeout=60) == 0, server.log()
    finally:
        server.stop()
