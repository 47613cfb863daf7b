"""POST /v1/inspect: a prompt's tokens, and what the model computes inside for them (refimpl/inspection.py).

The prompt (text, token ids, or messages rendered with the chat template) goes through the
reference forward pass once, with a probe that keeps the logit lens and the attention weights
asked for. The web chat's WebSocket asks the same question in an "inspect" message (webchat.py)
and gets this same response.

An inspection is not a generation: it does not wait in the engine's queue. It runs beside it, in
the thread pool that runs the engine's forward passes (engine.offload), one at a time: a second
one meanwhile gets 429 with Retry-After, so that inspections never pile up behind each other or
take the CPU from replies. Its size is bounded by refimpl.inspection's limits, and a request over
them gets 400 with the way to narrow it.
"""

import json
import threading

import numpy as np

from flask import current_app

from refimpl import inspection
from refimpl.explain import token_text

from webapp.common import caller, prompt_token_ids
from webapp.errors import ApiError
from webapp.parsing import Blueprint
from webapp.schemas import InspectRequest, InspectResponse

blp = Blueprint("inspect", __name__, url_prefix="/v1",
                description="Looking inside the model: a prompt's tokens, the logit lens (what each layer would "
                            "predict) and attention weights, from one reference forward pass. Limits: "
                            f"{inspection.MAX_TOKENS} prompt tokens; logit lens top at most {inspection.MAX_TOP}, "
                            f"positions x (layers + 1) at most {inspection.MAX_LENS_ROWS} and x top at most "
                            f"{inspection.MAX_LENS_ENTRIES}; attention (layer, head) pairs x the weights of the "
                            f"rows asked for at most {inspection.MAX_ATTENTION_WEIGHTS}.")

WEIGHT_DECIMALS = 6  # attention weights are rounded to this: 20 characters each would make responses 3x larger
running = threading.Lock()  # held while an inspection runs (one at a time per process)


@blp.route("/inspect", methods=["POST"])
@blp.arguments(InspectRequest)
@blp.response(200, InspectResponse)
def inspect(body):
    """Inspect a prompt: its tokens and their log-probabilities, the logit lens, attention weights."""
    result = run(body, caller())
    # Dumped as it is built (the schema documents it): marshmallow would take seconds over a million weights.
    return current_app.response_class(json.dumps(result, ensure_ascii=False), mimetype="application/json")


def run(body, who):
    """The response to a validated InspectRequest body, for the serving.Caller `who`; ApiError if refused."""
    state = who.model(body["model"])
    engine = state.engine
    model, tokenizer = engine.model, engine.tokenizer
    ids, spans = prompt_ids(body, tokenizer, model.config.vocab_size)
    lens, attention = body["logit_lens"], body["attention"]
    try:
        asked = inspection.request(model.config, len(ids), body["positions"],
                                   None if lens is None else lens["top"],
                                   None if attention is None else attention["layers"],
                                   None if attention is None else attention["heads"])
    except inspection.InspectionError as err:
        raise ApiError(400, str(err), err.param, "inspection_too_large" if err.too_large else "invalid_value") from None
    if not running.acquire(blocking=False):
        raise ApiError(429, "another inspection is running; retry in a moment", code="rate_limit_exceeded",
                       type="rate_limit_error", headers={"Retry-After": "1"})
    try:
        result = engine.offload(inspection.inspect, model, ids, asked)
    finally:
        running.release()
    who.log.usage = {"prompt_tokens": len(ids), "completion_tokens": 0}
    return response(result, tokenizer, state.model_id, spans)


def prompt_ids(body, tokenizer, vocab_size):
    """The prompt's token ids, and with messages where each message's turn starts and ends."""
    if body["messages"] is None:
        prompt = body["prompt"]
        if isinstance(prompt, str):
            return tokenizer.encode(prompt), None
        return prompt_token_ids(prompt, vocab_size), None
    messages, generation = body["messages"], bool(body["add_generation_prompt"])
    ids = tokenizer.encode_chat(messages, generation)
    return ids, message_spans(tokenizer, messages, ids)


def message_spans(tokenizer, messages, ids):
    """[start, end) of each message's turn in ids: where the conversation rendered up to it ends.
    None if a template renders a shorter conversation as something other than a prefix."""
    prefixes = [tokenizer.encode_chat(messages[:i + 1], False) for i in range(len(messages))]
    if any(ids[:len(prefix)] != prefix for prefix in prefixes):
        return None
    ends = [len(prefix) for prefix in prefixes]
    return [[start, end] for start, end in zip([0] + ends[:-1], ends)]


def response(result, tokenizer, model_id, spans):
    """The InspectResponse of a refimpl.inspection.Inspection."""
    def text(token_id):
        return token_text(tokenizer, token_id)[0]

    def candidate(token_id, logprob):
        return {"token_id": token_id, "token": text(token_id), "logprob": logprob}

    def lens_layer(layer, row, next_id):
        following = None if row.next_rank is None else \
            candidate(next_id, row.next_logprob) | {"rank": row.next_rank}
        return {"layer": layer, "top": [candidate(i, lp) for i, lp in row.top], "next_token": following,
                "entropy": row.entropy}

    ids, T = result.token_ids, len(result.token_ids)
    lens = None
    if result.lens is not None:
        lens = [[lens_layer(layer, row, ids[p + 1] if p + 1 < T else None) for layer, row in enumerate(rows)]
                for p, rows in zip(result.positions, result.lens)]
    attention = None
    if result.attention:
        attention = [{"layer": layer, "head": head,
                      "weights": [np.round(row.astype(np.float64), WEIGHT_DECIMALS).tolist() for row in rows]}
                     for (layer, head), rows in result.attention.items()]
    return {"object": "inspection", "model": model_id, "text": tokenizer.decode(ids),
            "token_ids": ids, "tokens": [text(i) for i in ids], "special": [i in tokenizer.special_ids for i in ids],
            "logprobs": result.logprobs,
            "message_tokens": spans, "positions": result.positions, "logit_lens": lens, "attention": attention,
            "usage": {"prompt_tokens": T, "total_tokens": T}}
