"""What the routes share: the request log line, the caller, sampling parameters, response ids, usage."""

import hmac
import logging
import secrets
import time

from flask import current_app, g, request

from refimpl import __version__
from refimpl.sampling import SamplingParams

from webapp import serving
from webapp.errors import ApiError
from webapp.serving import Caller, Client

SYSTEM_FINGERPRINT = f"refimpl-{__version__}"
log = logging.getLogger("refimpl.server")


class RequestLog:
    """One log line per request: id, method, path, status, tokens, seconds (never headers or bodies)."""

    def __init__(self, method, path):
        self.request_id, self.method, self.path = secrets.token_hex(8), method, path
        self.start, self.usage, self.done = time.perf_counter(), None, False

    def finish(self, status, note=""):
        if self.done:
            return
        self.done = True
        tokens = f" prompt={self.usage['prompt_tokens']} completion={self.usage['completion_tokens']}" \
            if self.usage else ""
        log.info("%s %s %s %d%s %.3fs%s", self.request_id, self.method, self.path, status, tokens,
                 time.perf_counter() - self.start, f" ({note})" if note else "")


def api_key_matches(given, api_key):
    """Whether a presented key is the server's, compared in constant time."""
    return hmac.compare_digest(given.strip().encode(), api_key.encode())


def current_model(requested_model):
    """The loaded model's state if the request names it (see serving.current_model)."""
    return serving.current_model(current_app.extensions["refimpl"].state, requested_model)


def caller():
    """The Caller of the HTTP request being served: the app's model and metrics, its log, its connection."""
    app = current_app.extensions["refimpl"]
    return Caller(app.state, app.metrics, g.log, Client.of(request.environ))


def sampling_params(body, default_max_tokens, logprobs, top_logprobs):
    """SamplingParams from a validated request body (null fields take OpenAI's defaults)."""
    stop = body["stop"]
    stop = [] if stop is None else stop if isinstance(stop, list) else [stop]

    def given(name, default):
        return default if body[name] is None else body[name]

    return SamplingParams(
        temperature=given("temperature", 1.0), top_p=given("top_p", 1.0), top_k=body["top_k"],
        min_p=given("min_p", 0.0), presence_penalty=given("presence_penalty", 0.0),
        frequency_penalty=given("frequency_penalty", 0.0), repetition_penalty=given("repetition_penalty", 1.0),
        logit_bias={int(k): v for k, v in (body["logit_bias"] or {}).items()}, seed=body["seed"],
        max_tokens=body["max_completion_tokens"] or body["max_tokens"] or default_max_tokens,
        n=given("n", 1), stop=[s for s in stop if isinstance(s, str)],
        stop_token_ids=[s for s in stop if isinstance(s, int)],
        logprobs=logprobs, top_logprobs=top_logprobs)


def prompt_token_ids(prompt, vocab_size):
    """A prompt given as token ids, checked against the model's vocabulary (400 naming the first outside it)."""
    if bad := [t for t in prompt if t >= vocab_size]:
        raise ApiError(400, f"prompt: token id {bad[0]} is not in this model's vocabulary (0..{vocab_size - 1})",
                       "prompt", "invalid_value")
    return list(prompt)


def include_usage(body):
    return bool(body["stream_options"] and body["stream_options"]["include_usage"])


def response_meta(prefix, object_name, caller):
    """The fields every response and chunk starts with; the id carries the request id for the logs."""
    return {"id": f"{prefix}-{caller.log.request_id}", "object": object_name,
            "created": int(time.time()), "model": caller.state.model_id, "system_fingerprint": SYSTEM_FINGERPRINT}


def usage(usages):
    """OpenAI's usage with mistral.rs's throughput fields, summed over generations and measured by them (seconds, not guesses)."""
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    prompt_s = sum(u.prompt_seconds for u in usages)
    completion_s = sum(u.completion_seconds for u in usages)

    def rate(tokens, seconds):
        return tokens / seconds if seconds > 0 else 0.0

    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "avg_tok_per_sec": rate(prompt + completion, prompt_s + completion_s),
            "avg_prompt_tok_per_sec": rate(prompt, prompt_s),
            "avg_compl_tok_per_sec": rate(completion, completion_s)}
