"""POST /v1/completions: raw prompts (text or token ids, one or many) -> continuations.

Each prompt gets its own n choices, numbered prompt_index * n + choice_index as OpenAI does.
Log-probabilities come in OpenAI's legacy shape: parallel lists of tokens, their log-probabilities,
the top alternatives as {token: logprob} and each token's character offset in the choice's text.
With echo, the prompt is part of the text, and with logprobs its tokens are scored too (the first
has no prefix, so its log-probability is null).
"""

import codecs
from dataclasses import dataclass

from flask import g

from webapp.common import (cancelling_at_exit, current_engine, include_usage, response_meta, sampling_params,
                            usage)
from webapp.errors import ApiError
from webapp.parsing import Blueprint
from webapp.schemas import CompletionRequest, CompletionResponse
from webapp.streaming import SSE_EVENT, stream_response

blp = Blueprint("completions", __name__, url_prefix="/v1",
                description="Text completions (OpenAI's legacy endpoint; streams, unlike the seed's).")

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


@dataclass
class Run:
    """One prompt of the request and its generation (submitted to the engine)."""
    first_index: int
    ids: list
    text: str
    generation: object


@dataclass
class CompletionJob:
    engine: object
    runs: list
    meta: dict
    n: int
    echo: bool
    logprobs: int | None
    include_usage: bool
    log: object


@blp.route("/completions", methods=["POST"])
@blp.arguments(CompletionRequest)
@blp.response(200, CompletionResponse)
@blp.doc(responses={200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}})
def create_completion(body):
    """Create a completion for one or several prompts (set stream for server-sent events)."""
    job = prepare(body)
    if body["stream"]:
        return stream_response(chunks(job), CompletionResponse())
    return complete_all(job)


def prepare(body):
    """Tokenize every prompt and check every generation before any model work."""
    engine = current_engine(body["model"])
    params = sampling_params(body, DEFAULT_MAX_TOKENS, body["logprobs"] is not None, body["logprobs"] or 0)
    runs = []
    try:
        submit_all(engine, body["prompt"], params, runs)
    except Exception:
        engine.cancel(run.generation for run in runs)  # the earlier prompts were already queued
        raise
    return CompletionJob(engine, runs, response_meta("cmpl", "text_completion", engine), params.n,
                         bool(body["echo"]), body["logprobs"], include_usage(body), g.log)


def submit_all(engine, prompts, params, runs):
    """Tokenize and submit every prompt, appending a Run for each to runs."""
    for p, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            ids, text = engine.text_prompt(prompt), prompt
        else:
            bad = [t for t in prompt if t >= engine.vocab_size]
            if bad:
                raise ApiError(400, f"prompt: token id {bad[0]} is not in this model's vocabulary "
                                    f"(0..{engine.vocab_size - 1})", "prompt", "invalid_value")
            ids, text = prompt, engine.decode(prompt)
        if not ids:
            raise ApiError(400, "prompt: the prompt is empty; at least one token is needed", "prompt", "invalid_value")
        runs.append(Run(p * params.n, ids, text, engine.start(ids, params)))


class LegacyLogprobs:
    """OpenAI's legacy logprobs of one choice, with each token's character offset in the text."""

    def __init__(self, offset=0):
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.offset = offset  # where the next token's text starts in the choice's text

    def add(self, token, raw, logprob, top):
        self.tokens.append(token)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(None if top is None else {t.token: t.logprob for t in top})
        self.text_offset.append(self.offset)
        self.offset += len(self.utf8.decode(bytes(raw)))

    def continued(self, offset):
        """A copy holding the same entries, whose next token starts at `offset` (after the echoed prompt)."""
        twin = LegacyLogprobs(offset)
        twin.tokens, twin.token_logprobs = list(self.tokens), list(self.token_logprobs)
        twin.top_logprobs, twin.text_offset = list(self.top_logprobs), list(self.text_offset)
        return twin

    def take(self):
        """The entries added since the last take (all of them, or a streamed chunk's share)."""
        out = {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
               "text_offset": self.text_offset}
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return out


@dataclass
class Choice:
    text: str
    logprobs: LegacyLogprobs | None
    finish_reason: str | None = None

    def add(self, event):
        if self.logprobs is not None and event.logprobs:
            lp = event.logprobs
            self.logprobs.add(lp.token, lp.bytes, lp.logprob, lp.top)
        self.text += event.text
        self.finish_reason = event.finish_reason or self.finish_reason


def start_choices(job, run):
    """The n choices of one prompt, holding the echoed prompt (and its scored tokens) when asked."""
    if job.logprobs is None:
        return [Choice(run.text if job.echo else "", None) for _ in range(job.n)]
    if not job.echo:
        return [Choice("", LegacyLogprobs()) for _ in range(job.n)]
    prompt = LegacyLogprobs()
    for token_id, entry in zip(run.ids, job.engine.score(run.ids, job.logprobs)):
        token, raw = job.engine.piece(token_id)
        prompt.add(token, raw, None if entry is None else entry.logprob, None if entry is None else entry.top)
    return [Choice(run.text, prompt.continued(len(run.text))) for _ in range(job.n)]


def complete_all(job):
    """The whole response; if one prompt fails, the others' requests are cancelled, not left running."""
    try:
        return complete(job)
    finally:
        job.engine.cancel(run.generation for run in job.runs)


def complete(job):
    out = []
    for run in job.runs:
        choices = start_choices(job, run)
        for event in job.engine.events(run.generation):
            choices[event.index].add(event)
        out += [{"index": run.first_index + i, "text": c.text, "finish_reason": c.finish_reason,
                 "logprobs": None if c.logprobs is None else c.logprobs.take()} for i, c in enumerate(choices)]
    job.log.usage = usage([run.generation.usage for run in job.runs])
    return {**job.meta, "choices": out, "usage": job.log.usage}


def chunks(job):
    """text_completion chunks: per choice the echoed prompt first (if asked), then the text as it comes."""
    # SSE and the WebSocket both stream through here, so both cancel what a vanished client left.
    return cancelling_at_exit(job.engine, [run.generation for run in job.runs], chunk_objects(job))


def chunk_objects(job):
    extra = {"usage": None} if job.include_usage else {}

    def chunk(index, text, logprobs, finish_reason=None):
        return {**job.meta, "choices": [{"index": index, "text": text, "finish_reason": finish_reason,
                                         "logprobs": None if logprobs is None else logprobs.take()}], **extra}

    for run in job.runs:
        choices = start_choices(job, run)
        if job.echo:
            for i, choice in enumerate(choices):
                yield chunk(run.first_index + i, choice.text, choice.logprobs)
        for event in job.engine.events(run.generation):
            choice = choices[event.index]
            choice.add(event)
            if event.text or event.logprobs or event.finish_reason:
                yield chunk(run.first_index + event.index, event.text, choice.logprobs, event.finish_reason)
    job.log.usage = usage([run.generation.usage for run in job.runs])
    if job.include_usage:
        yield {**job.meta, "choices": [], "usage": job.log.usage}
