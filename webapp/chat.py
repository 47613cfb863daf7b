"""POST /v1/chat/completions: messages -> the model's chat template -> tokens -> a reply."""

from dataclasses import dataclass

from flask import g

from webapp.common import (cancelling_at_exit, current_engine, include_usage, response_meta, sampling_params,
                            usage)
from webapp.parsing import Blueprint
from webapp.schemas import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse
from webapp.streaming import SSE_EVENT, stream_response

blp = Blueprint("chat", __name__, url_prefix="/v1", description="Chat completions (OpenAI's, with the seed's extras).")


@dataclass
class ChatJob:
    """A validated chat request, submitted to the engine."""
    engine: object
    generation: object
    meta: dict
    n: int
    logprobs: bool
    include_usage: bool
    log: object


@blp.route("/chat/completions", methods=["POST"])
@blp.arguments(ChatCompletionRequest)
@blp.response(200, ChatCompletionResponse)
@blp.doc(responses={200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}})
def create_chat_completion(body):
    """Create a chat completion (set stream for server-sent events)."""
    job = prepare(body)
    if body["stream"]:
        return stream_response(chunks(job), ChatCompletionChunk())
    return complete(job)


def prepare(body, explain=0):
    """Everything that can refuse the request, before any model work: model, template, params, context.

    `explain` > 0 asks for each token's insight with that many alternatives (the web chat's token view)."""
    engine = current_engine(body["model"])
    ids = engine.chat_prompt(body["messages"])
    params = sampling_params(body, None, bool(body["logprobs"]), body["top_logprobs"] or 0)
    params.explain = explain
    generation = engine.start(ids, params)
    return ChatJob(engine, generation, response_meta("chatcmpl", "chat.completion", engine), params.n,
                   params.logprobs, include_usage(body), g.log)


def logprob_entry(lp):
    """One generated token's log-probability in OpenAI's chat shape."""
    return {"token": lp.token, "logprob": lp.logprob, "bytes": lp.bytes,
            "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in lp.top]}


def complete(job):
    texts, logprobs, finish = [[] for _ in range(job.n)], [[] for _ in range(job.n)], [None] * job.n
    for event in job.engine.events(job.generation):
        texts[event.index].append(event.text)
        if event.logprobs:
            logprobs[event.index].append(logprob_entry(event.logprobs))
        finish[event.index] = event.finish_reason or finish[event.index]
    job.log.usage = usage([job.generation.usage])
    return {**job.meta, "choices": [
        {"index": i, "message": {"role": "assistant", "content": "".join(texts[i])},
         "logprobs": {"content": logprobs[i]} if job.logprobs else None, "finish_reason": finish[i]}
        for i in range(job.n)], "usage": job.log.usage}


def chunks(job):
    """The chat.completion.chunk objects of a streamed reply: role first, then content, then finish."""
    # SSE and the WebSocket both stream through here, so both cancel what a vanished client left.
    return cancelling_at_exit(job.engine, [job.generation], chunk_objects(job))


def chunk_objects(job):
    meta = {**job.meta, "object": "chat.completion.chunk"}
    extra = {"usage": None} if job.include_usage else {}

    def chunk(index, delta, logprobs=None, finish_reason=None):
        return {**meta, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": finish_reason}], **extra}

    for i in range(job.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    for event in job.engine.events(job.generation):
        if not (event.text or event.logprobs or event.finish_reason):
            continue  # a token that released no text yet (part of a character, or of a stop string)
        delta = {"content": event.text} if event.text or event.logprobs else {}
        logprobs = {"content": [logprob_entry(event.logprobs)]} if event.logprobs else None
        yield chunk(event.index, delta, logprobs, event.finish_reason)
    job.log.usage = usage([job.generation.usage])
    if job.include_usage:
        yield {**meta, "choices": [], "usage": job.log.usage}
