"""Test doubles for `refimpl compare`: small OpenAI-compatible servers that compute with refimpl and
get one thing wrong on purpose, the way real engines have been wrong.

Faults:
  "none"          honest: what a correct engine reports (prompt and generated rows both scored as a prompt)
  "shift"         log-probabilities one position off: the value at t is the one for token t + 1
  "bos"           a BOS token put before every prompt, not shown in the echo
  "half"          weights rounded to float16: a lower-precision engine
  "no-logprobs"   answers, but without log-probabilities
  "retokenize"    tokenizes text prompts itself and refuses token ids, splitting text differently
Only greedy decoding, /v1/models, /v1/completions (prompt, echo, logprobs) and /v1/chat/completions
(logprobs, top_logprobs) are served: what compare asks for.
"""

import threading

import numpy as np
from flask import Flask, jsonify, request
from safetensors.numpy import load_file, save_file
from werkzeug.serving import make_server

from refimpl.explain import token_text
from refimpl.generate import generate, load, prompt_logprobs
from refimpl.sampling import SamplingParams


def text_offsets(tokenizer, ids):
    """Where each token starts in the text, as llama-cpp-python counts: the characters of the text
    before it, a character cut in two not counted yet."""
    raw = [tokenizer.token_bytes(i) for i in ids]
    return [len(b"".join(raw[:k]).decode("utf-8", errors="ignore")) for k in range(len(ids))]


def half_precision_copy(model_dir, dst):
    """A copy of the model directory whose weights went through float16 and back."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(f)
            save_file({k: v.astype(np.float16).astype(np.float32) for k, v in tensors.items()}, dst / f.name)
        else:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


class Double:
    def __init__(self, model_dir, fault):
        self.fault = fault
        self.model, self.tokenizer, self.stop_ids = load(model_dir)
        self.app = Flask(__name__)
        self.app.post("/v1/completions")(self.completions)
        self.app.post("/v1/chat/completions")(self.chat)
        self.app.get("/v1/models")(lambda: jsonify({"object": "list", "data": [{"id": f"double-{fault}"}]}))
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.base = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()

    def run(self, ids, max_tokens, top):
        """(generated ids, entries of prompt + generated tokens) as this double computes and reports them."""
        if self.fault == "bos":
            ids = [self.tokenizer.bos_token_id, *ids]
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        generated = [e.token_id for e in generate(self.model, self.tokenizer, ids, params, self.stop_ids)
                     if e.token_id is not None]
        entries = prompt_logprobs(self.model, self.tokenizer, ids + generated, top)
        if self.fault == "bos":  # the BOS's own row is not shown: the first token reports null, as ever
            entries = [None, *entries[2:]]
        if self.fault == "shift":
            entries = [None, *entries[2:], entries[-1]]
        return generated, entries

    def completions(self):
        body = request.get_json()
        prompt, top = body["prompt"], body.get("logprobs") or 0
        if self.fault == "retokenize":
            if not isinstance(prompt, str):
                return jsonify({"error": {"message": "prompt must be text"}}), 400
            ids = [t for word in prompt.split(" ") for t in self.tokenizer.encode(word + " ")][:-1]
        else:
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        generated, entries = self.run(ids, body.get("max_tokens", 16), top)
        shown = ids + generated if body.get("echo") else generated
        entries = entries if body.get("echo") else entries[len(ids):]
        texts = [token_text(self.tokenizer, t)[0] for t in shown]
        choice = {"index": 0, "text": self.tokenizer.decode(shown), "finish_reason": "length"}
        if body.get("logprobs") is not None and self.fault != "no-logprobs":
            choice["logprobs"] = {
                "tokens": texts, "text_offset": text_offsets(self.tokenizer, shown),
                "token_logprobs": [None if e is None else e.logprob for e in entries],
                "top_logprobs": [None if e is None else {t.token: t.logprob for t in e.top} for e in entries]}
        return jsonify({"object": "text_completion", "choices": [choice],
                        "usage": {"prompt_tokens": len(ids), "completion_tokens": len(generated)}})

    def chat(self):
        body = request.get_json()
        ids = self.tokenizer.encode_chat(body["messages"])
        generated, entries = self.run(ids, body.get("max_tokens", 16), body.get("top_logprobs") or 0)
        message = {"role": "assistant", "content": self.tokenizer.decode(generated, skip_special_tokens=True)}
        choice = {"index": 0, "message": message, "finish_reason": "length"}
        if body.get("logprobs") and self.fault != "no-logprobs":
            choice["logprobs"] = {"content": [
                {"token": e.token, "logprob": e.logprob, "bytes": e.bytes,
                 "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in e.top]}
                for e in entries[len(ids):]]}
        return jsonify({"object": "chat.completion", "choices": [choice],
                        "usage": {"prompt_tokens": len(ids), "completion_tokens": len(generated)}})
