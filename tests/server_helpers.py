"""Helpers for the server tests: a tiny model directory with a tokenizer, and a live server process.

golden/tiny/llama-untied has random weights (vocabulary 512, context 512) but no tokenizer, so
`tiny_model_dir` writes one next to a copy of it (or of another tiny model): byte-level BPE over the 256 byte symbols, three
ChatML special tokens (ids 0-2, as the config's bos/eos expect) and 253 letter-pair merges that
fill the vocabulary exactly, so that every id the model can produce is a token. Generation on it
takes milliseconds, which is what the error table and schemathesis need; the openai-client tests
run the real default model.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "golden" / "tiny"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_model_dir(dst, context=None, source="llama-untied"):
    """Copy a tiny random model (golden/tiny/<source>) into dst with a byte-level BPE tokenizer that
    fills its vocabulary; `context` shortens its context window (max_position_embeddings), which
    bounds how long any generation can run."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    TINY_SOURCE = TINY / source
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("generation_config.json", "model.safetensors"):
        shutil.copy(TINY_SOURCE / name, dst / name)
    config = json.loads((TINY_SOURCE / "config.json").read_text())
    if context:  # GPT-2 calls its context n_positions
        config["n_positions" if "n_positions" in config else "max_position_embeddings"] = context
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    vocab_size = config["vocab_size"]
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    letters, merges = "etaoinshrdlucmfwypvbgkqjxz", []
    for a in letters:
        for b in letters:
            if len(vocab) < vocab_size:
                vocab[a + b] = len(vocab)
                merges.append((a, b))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIALS)
    assert backend.get_vocab_size(with_added_tokens=True) == vocab_size
    backend.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": CHATML}))
    return dst


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`refimpl serve` in a subprocess on a free loopback port; its log is kept for the tests to read."""

    def __init__(self, model, *args, env=None, log_path, startup_timeout=120):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.log_file = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "refimpl", "serve", "--model", str(model), "--port", str(self.port), *args],
            cwd=ROOT, env={**os.environ, **(env or {})}, stdout=self.log_file, stderr=subprocess.STDOUT)
        self.wait_ready(startup_timeout)

    def wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.base}/health", timeout=5).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or busy reading weights
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server was not ready within {timeout} s:\n{self.log()}")

    def log(self):
        self.log_file.flush()
        return self.log_path.read_text()

    def metric(self, name):
        """The value of one sample of /metrics (e.g. refimpl_running_sequences)."""
        text = requests.get(f"{self.base}/metrics", timeout=5).text
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        assert match, f"{name} not in /metrics:\n{text}"
        return float(match.group(1))

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()


def sse_events(response):
    """Split a raw text/event-stream body into its blocks ("data: ..." or ": keep-alive")."""
    text = response.text if hasattr(response, "text") else response
    assert text.endswith("\n\n"), f"the stream does not end with a blank line: {text[-80:]!r}"
    return text[:-2].split("\n\n")


def data_events(blocks):
    """The JSON objects of the data: events, and whether [DONE] came last."""
    data = [b[len("data: "):] for b in blocks if b.startswith("data: ")]
    return [json.loads(d) for d in data if d != "[DONE]"], data[-1] == "[DONE]"
