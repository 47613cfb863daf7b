"""POST /v1/completions: raw prompts (text or token ids, one or many) -> continuations.

Each prompt gets its own n choices, numbered prompt_index * n + choice_index as OpenAI does.
Log-probabilities come in OpenAI's legacy shape: parallel lists of tokens, their log-probabilities,
the top alternatives as {token: logprob} and each token's character offset in the choice's text.
With echo, the prompt is part of the text, and with logprobs its tokens are scored too (the first
has no prefix, so its log-probability is null).
"""

import codecs
from dataclasses import dataclass

from refimpl.explain import token_text

from webapp.common import caller, include_usage, prompt_token_ids, response_meta, sampling_params, usage
from webapp.errors import ApiError
from webapp.parsing import Blueprint
from webapp.schemas import CompletionRequest, CompletionResponse
from webapp.streaming import SSE_EVENT, stream_response

blp = Blueprint("completions", __name__, url_prefix="/v1",
                description="Text completions: OpenAI's legacy endpoint (one or many prompts, as text or token ids; "
                            "echo; logprobs; streaming) with the same extras as chat.")

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


@dataclass
class Prompt:
    """One prompt of the request: its tokens, its text, and the index of its first choice."""
    first_index: int
    ids: list
    text: str


@dataclass
class CompletionJob:
    job: object  # serving.Job: one generation per prompt, in order
    prompts: list
    tokenizer: object
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
    completion = prepare(body, caller())
    if body["stream"]:
        return stream_response(chunks(completion), CompletionResponse(), completion.log)
    return complete(completion)


def prepare(body, who):
    """Tokenize every prompt, then submit them all at once (all are queued, or none)."""
    engine = who.model(body["model"]).engine
    params = sampling_params(body, DEFAULT_MAX_TOKENS, body["logprobs"] is not None, body["logprobs"] or 0)
    prompts = [tokenized(prompt, engine, p * params.n) for p, prompt in enumerate(body["prompt"])]
    # echo with logprobs scores the prompt: in the engine, chunk by chunk, as part of its prefill.
    score_top = body["logprobs"] if body["echo"] else None
    job = who.submit([p.ids for p in prompts], params, score_top)
    return CompletionJob(job, prompts, engine.tokenizer, response_meta("cmpl", "text_completion", who), params.n,
                         bool(body["echo"]), body["logprobs"], include_usage(body), who.log)


def tokenized(prompt, engine, first_index):
    if isinstance(prompt, str):
        ids, text = engine.tokenizer.encode(prompt), prompt
    else:
        ids = prompt_token_ids(prompt, engine.model.config.vocab_size)
        text = engine.tokenizer.decode(ids)
    if not ids:
        raise ApiError(400, "prompt: the prompt is empty; at least one token is needed", "prompt", "invalid_value")
    return Prompt(first_index, ids, text)


class LogprobLists:
    """OpenAI's legacy logprobs of one choice: parallel lists of tokens, their log-probabilities,
    the top alternatives as {token: logprob}, and where each token starts in the choice's text."""

    def __init__(self):
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []

    def add(self, token, logprob, top, offset):
        self.tokens.append(token)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(None if top is None else {t.token: t.logprob for t in top})
        self.text_offset.append(offset)

    def copy(self):
        twin = LogprobLists()
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
class TextChoice:
    """One choice as it grows: its text (after the echoed prompt, if any) and its logprob lists."""
    text: str
    logprobs: LogprobLists | None
    start: int  # where generated text begins in `text`, in characters
    finish_reason: str | None = None

    def add(self, event):
        # The end-of-sequence token adds no text but is listed, as vLLM lists it: a scorer that
        # slices token_logprobs by position must see every generated token.
        if self.logprobs is not None and event.logprobs:
            lp = event.logprobs
            self.logprobs.add(lp.token, lp.logprob, lp.top, self.start + event.offset)
        self.text += event.text
        self.finish_reason = event.finish_reason or self.finish_reason


def start_choices(completion, number, request):
    """The n choices of prompt `number`, holding the echoed prompt (and its scores) when asked; called
    once its generation has sent its first event, by when the engine has scored the prompt."""
    prompt = completion.prompts[number]
    text = prompt.text if completion.echo else ""
    if completion.logprobs is None:
        return [TextChoice(text, None, len(text)) for _ in range(completion.n)]
    lists = LogprobLists()
    if completion.echo:
        for token_id, entry, offset in zip(prompt.ids, request.prompt_logprobs,
                                           prompt_offsets(completion.tokenizer, prompt.ids)):
            lists.add(token_text(completion.tokenizer, token_id)[0], None if entry is None else entry.logprob,
                      None if entry is None else entry.top, offset)
    return [TextChoice(text, lists.copy(), len(text)) for _ in range(completion.n)]


def prompt_offsets(tokenizer, ids):
    """Where each prompt token starts in the prompt's text, in characters, counted as generation
    counts Event.offset: a token's first byte belongs to the character at the end of the text so far.
    A special token stands in the echoed text as its marker (e.g. "<|im_start|>"), so it counts so."""
    utf8, offsets, length = codecs.getincrementaldecoder("utf-8")(errors="replace"), [], 0
    for token_id in ids:
        offsets.append(length)
        length += len(utf8.decode(bytes(token_text(tokenizer, token_id)[1])))
    return offsets


def complete(completion):
    choices = {}  # prompt number -> its TextChoices
    for item in completion.job.events():
        if item is not None:
            number, event = item
            if number not in choices:
                choices[number] = start_choices(completion, number, completion.job.requests[number])
            choices[number][event.index].add(event)
    out = [{"index": completion.prompts[number].first_index + i, "text": c.text, "finish_reason": c.finish_reason,
            "logprobs": None if c.logprobs is None else c.logprobs.take()}
           for number in sorted(choices) for i, c in enumerate(choices[number])]
    completion.log.usage = usage(completion.job.usages())
    return {**completion.meta, "choices": out, "usage": completion.log.usage}


def chunks(completion):
    """text_completion chunks: per choice the echoed prompt first (if asked), then the text as it comes;
    None while nothing is ready (see serving.Job.events)."""
    extra = {"usage": None} if completion.include_usage else {}

    def chunk(index, text, logprobs, finish_reason=None):
        return {**completion.meta, "choices": [{"index": index, "text": text, "finish_reason": finish_reason,
                                                "logprobs": None if logprobs is None else logprobs.take()}],
                **extra}

    choices = {}
    for item in completion.job.events():
        if item is None:
            yield None
            continue
        number, event = item
        first = completion.prompts[number].first_index
        if number not in choices:
            choices[number] = start_choices(completion, number, completion.job.requests[number])
            if completion.echo:
                for i, choice in enumerate(choices[number]):
                    yield chunk(first + i, choice.text, choice.logprobs)
        choice = choices[number][event.index]
        choice.add(event)
        if event.text or event.logprobs or event.finish_reason:
            yield chunk(first + event.index, event.text, choice.logprobs, event.finish_reason)
        else:
            yield None
    completion.log.usage = usage(completion.job.usages())
    if completion.include_usage:
        yield {**completion.meta, "choices": [], "usage": completion.log.usage}
