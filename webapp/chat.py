"""POST /v1/chat/completions: messages -> the model's chat template -> tokens -> a reply.

With response_format or tools, the reply decodes under a grammar and tool calls are read back
from its text (tools.py)."""

from dataclasses import dataclass

from webapp import tools
from webapp.common import caller, include_usage, response_meta, sampling_params, usage
from webapp.parsing import Blueprint
from webapp.schemas import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse
from webapp.streaming import SSE_EVENT, stream_response

blp = Blueprint("chat", __name__, url_prefix="/v1",
                description="Chat completions: OpenAI's API plus mistral.rs's extras (top_k, min_p, "
                            "repetition_penalty, stop token ids, messages as a plain string, usage timings); "
                            "and the web chat's WebSocket.")


@dataclass
class ChatJob:
    """A validated chat request, submitted to the engine."""
    job: object  # serving.Job of the one generation
    meta: dict
    n: int
    logprobs: bool
    include_usage: bool
    log: object
    calls: bool  # the reply may hold tool calls: read them back


@blp.route("/chat/completions", methods=["POST"])
@blp.arguments(ChatCompletionRequest)
@blp.response(200, ChatCompletionResponse)
@blp.doc(responses={200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}})
def create_chat_completion(body):
    """Create a chat completion (set stream for server-sent events)."""
    chat = prepare(body, caller())
    if body["stream"]:
        return stream_response(chunks(chat), ChatCompletionChunk(), chat.log)
    return complete(chat)


def prepare(body, who, explain=0):
    """Everything that can refuse the request, before any model work: model, template, params, context.

    `who` is the serving.Caller; `explain` > 0 asks for each token's insight with that many
    alternatives (the web chat's token view)."""
    engine = who.model(body["model"]).engine
    offered, required = tools.active_tools(body)
    messages, template_tools = tools.prompt_messages(body, offered, engine.tokenizer)
    ids = engine.tokenizer.encode_chat(messages, tools=template_tools)
    params = sampling_params(body, None, bool(body["logprobs"]), body["top_logprobs"] or 0)
    params.explain = explain
    params.grammar = tools.grammar_for(body, offered, required, engine.grammars)
    return ChatJob(who.submit([ids], params), response_meta("chatcmpl", "chat.completion", who), params.n,
                   params.logprobs, include_usage(body), who.log, bool(offered))


def logprob_entry(lp):
    """One generated token's log-probability in OpenAI's chat shape."""
    return {"token": lp.token, "logprob": lp.logprob, "bytes": lp.bytes,
            "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in lp.top]}


def token_logprobs(event):
    """The event's log-probabilities as chat reports them: none for the end-of-turn token, which
    is not part of the message (OpenAI's chat API does not list it)."""
    return logprob_entry(event.logprobs) if event.logprobs and not event.stop_token else None


def complete(chat):
    texts, logprobs, finish = [[] for _ in range(chat.n)], [[] for _ in range(chat.n)], [None] * chat.n
    for item in chat.job.events():
        if item is None:
            continue
        _, event = item
        texts[event.index].append(event.text)
        if entry := token_logprobs(event):
            logprobs[event.index].append(entry)
        finish[event.index] = event.finish_reason or finish[event.index]
    chat.log.usage = usage(chat.job.usages())
    choices = []
    for i in range(chat.n):
        reply, finish_reason = message("".join(texts[i]), finish[i], chat.calls)
        choices.append({"index": i, "message": reply, "logprobs": {"content": logprobs[i]} if chat.logprobs else None,
                        "finish_reason": finish_reason})
    return {**chat.meta, "choices": choices, "usage": chat.log.usage}


def message(text, finish_reason, calls):
    """A choice's message and finish_reason: with tool calls read back when the request had tools."""
    content, tool_calls = tools.split_calls(text) if calls else (text, None)
    if not tool_calls:
        return {"role": "assistant", "content": content}, finish_reason
    return ({"role": "assistant", "content": content, "tool_calls": tool_calls},
            "tool_calls" if finish_reason == "stop" else finish_reason)


def chunks(chat):
    """The chat.completion.chunk objects of a streamed reply: role first, then content, then finish;
    None while nothing is ready (see serving.Job.events)."""
    meta = {**chat.meta, "object": "chat.completion.chunk"}
    extra = {"usage": None} if chat.include_usage else {}

    def chunk(index, delta, logprobs=None, finish_reason=None):
        return {**meta, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": finish_reason}], **extra}

    for i in range(chat.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    streams = [tools.CallDeltas() for _ in range(chat.n)] if chat.calls else None
    for item in chat.job.events():
        if item is None:
            yield None
            continue
        _, event = item
        entry = token_logprobs(event)
        if streams is not None:  # content, or tool calls as they form
            yield from call_chunks(chunk, streams[event.index], event, entry)
            continue
        if not (event.text or entry or event.finish_reason):
            yield None  # a token that released no text yet (part of a character, or of a stop string)
            continue
        delta = {"content": event.text} if event.text or entry else {}
        yield chunk(event.index, delta, {"content": [entry]} if entry else None, event.finish_reason)
    chat.log.usage = usage(chat.job.usages())
    if chat.include_usage:
        yield {**meta, "choices": [], "usage": chat.log.usage}


def call_chunks(chunk, stream, event, entry):
    """The chunks of one event of a reply that may call tools (tools.CallDeltas); logprobs ride on
    the first chunk, the finish reason ("tool_calls" once a call was sent) on the last."""
    deltas = stream.push(event.text)
    if event.finish_reason:
        deltas += stream.finish()
    logprobs = {"content": [entry]} if entry else None
    if not deltas and (logprobs or event.finish_reason):
        deltas = [{}]
    if not deltas:
        yield None
    for k, delta in enumerate(deltas):
        last = k == len(deltas) - 1
        finish = event.finish_reason if last else None
        if finish == "stop" and stream.calls:
            finish = "tool_calls"
        yield chunk(event.index, delta, logprobs if k == 0 else None, finish)
