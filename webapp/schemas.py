"""marshmallow schemas for every request and response, field names as OpenAI spells them.

The OpenAPI document (/openapi.json) is generated from these classes; nothing in it is written
by hand. Requests are read strictly, because a reference server should say when it was
misunderstood rather than guess:

- JSON types are exact: 3.0 is not an integer, "3" is not a number, 1 is not a boolean.
- A field may be null wherever OpenAI allows it to be omitted; null means "the default".
- Unknown fields are ignored (as mistral.rs and the OpenAI clients' extra fields expect), but
  the OpenAI features this server does not implement (the deprecated functions and
  function_call, suffix, best_of > 1) are refused with 400, so that a request is never silently
  answered as something other than what it asked for.

Limits this server chooses where neither OpenAI nor mistral.rs sets one: n <= 16 (each choice
keeps its own KV cache on a CPU), at most 64 prompts per completions request, at most 16 stop
sequences, at most 1024 logit_bias entries, top_logprobs and completions' logprobs up to 20,
at most 128 tools (OpenAI's limit).

Each request schema's EXAMPLE is the body Swagger UI's "Try it out" starts from (meta.py puts it
in the OpenAPI document): small and real, where a body built from the fields' defaults would be
nulls that generate to the end of the context window.
"""

import copy

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, validate, validates_schema

from refimpl import inspection
from refimpl.sampling import MAX_STOP, MAX_STOP_CHARS, MAX_TOP_LOGPROBS

MAX_PROMPTS = 64
MAX_LOGIT_BIAS = 1024
ROLES = ("system", "user", "assistant", "developer", "tool")
MAX_TOOLS = 128  # OpenAI's limit on tools per request


# --- Strict JSON fields ---------------------------------------------------------------------

def json_type(value):
    """The JSON type name of a parsed value ("integer" for ints, never for booleans)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


class Integer(fields.Integer):
    """A JSON integer: not true/false, not 3.0, not "3"."""

    def __init__(self, **kwargs):
        super().__init__(strict=True, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        if json_type(value) != "integer":
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class Float(fields.Float):
    """A finite JSON number (integer or decimal): not a string, not a boolean."""

    def _deserialize(self, value, attr, data, **kwargs):
        if json_type(value) not in ("integer", "number"):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class Boolean(fields.Boolean):
    """JSON true or false only (marshmallow would also take "yes", 1, "on", ...)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if json_type(value) != "boolean":
            raise self.make_error("invalid")
        return value


String = fields.String  # marshmallow's String already refuses non-strings


class Either(fields.Field):
    """A field with several JSON shapes, e.g. stop: "x" | ["x", "y"] | 7 | [7, 8].

    The alternative is chosen by the value's JSON type, so an error names what is wrong inside
    that shape (messages[2].role) rather than listing every shape that was not meant.
    """

    def __init__(self, **alternatives):
        self.alternatives = {name: alternatives.pop(name) for name in list(alternatives)
                             if isinstance(alternatives[name], fields.Field)}
        super().__init__(**alternatives)

    def _bind_to_schema(self, field_name, parent):
        super()._bind_to_schema(field_name, parent)
        self.alternatives = {kind: copy.deepcopy(field) for kind, field in self.alternatives.items()}
        for field in self.alternatives.values():
            field._bind_to_schema(field_name, self)

    def _deserialize(self, value, attr, data, **kwargs):
        kind = json_type(value)
        if kind == "integer" and "integer" not in self.alternatives:
            kind = "number"  # a JSON integer is also a number
        if kind not in self.alternatives:
            raise ValidationError(f"must be {' or '.join(self.describe())}, not {json_type(value)}")
        return self.alternatives[kind].deserialize(value, attr, data, **kwargs)

    def _serialize(self, value, attr, obj, **kwargs):
        return value

    def describe(self):
        return [{"array": "an array", "object": "an object", "integer": "an integer"}.get(k, f"a {k}")
                for k in self.alternatives]


def either2properties(converter, field, **kwargs):
    """apispec attribute function: an Either field is documented as anyOf its alternatives."""
    if not isinstance(field, Either):
        return {}
    return {"anyOf": [converter.field2property(f) for f in field.alternatives.values()]}


class Unsupported(fields.Raw):
    """An OpenAI field this server does not implement: only its neutral values are accepted."""

    def __init__(self, neutral, what, **kwargs):
        self.neutral, self.what = neutral, what
        super().__init__(allow_none=True, load_default=None,
                         metadata={"description": f"Not supported by this server: {what}. "
                                                  f"Only {' or '.join(map(repr, neutral))} or null is accepted."},
                         **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        if value not in self.neutral:
            raise ValidationError(f"is not supported by this server ({self.what})")
        return None


def optional(field_class, description, **kwargs):
    """An optional, nullable field (OpenAI clients send null for 'not set')."""
    return field_class(allow_none=True, load_default=None, metadata={"description": description}, **kwargs)


def at_most_entries(limit):
    def check(value):
        if len(value) > limit:
            raise ValidationError(f"at most {limit} entries")
    return check


def token_id(**kwargs):
    return Integer(validate=validate.Range(min=0), **kwargs)


# --- Requests -------------------------------------------------------------------------------

class RequestSchema(Schema):
    class Meta:
        unknown = EXCLUDE  # unknown fields are ignored (see the module docstring)


class TextPart(RequestSchema):
    type = String(required=True, validate=validate.OneOf(["text"]),
                  metadata={"description": "Only text parts: this is a text-only model."})
    text = String(required=True)


class FunctionCall(RequestSchema):
    name = String(required=True, validate=validate.Length(min=1))
    arguments = String(required=True, metadata={"description": "The arguments, as a JSON text."})


class ToolCall(RequestSchema):
    id = String(required=True)
    type = String(load_default="function", validate=validate.OneOf(["function"]))
    function = fields.Nested(FunctionCall, required=True)


class ChatMessage(RequestSchema):
    role = String(required=True, validate=validate.OneOf(ROLES),
                  metadata={"description": "developer is read as system."})
    content = Either(string=String(), array=fields.List(fields.Nested(TextPart), validate=validate.Length(min=1)),
                     allow_none=True, load_default=None,
                     metadata={"description": "The text, or a list of text parts (joined); null only in an "
                                              "assistant message with tool_calls."})
    name = optional(String, "Ignored by the chat template of most models.")
    tool_calls = fields.List(fields.Nested(ToolCall), allow_none=True, load_default=None, validate=validate.Length(min=1),
                             metadata={"description": "An assistant message's calls (its content may then be null)."})
    tool_call_id = optional(String, "A tool message: the id of the call it answers.")

    @validates_schema
    def fields_of_the_role(self, data, **kwargs):
        role, calls = data.get("role"), data.get("tool_calls")
        if calls is not None and role != "assistant":
            raise ValidationError(f"only an assistant message has tool_calls, not a {role} message", "tool_calls")
        if data.get("content") is None and not calls:
            raise ValidationError("is required (null only in an assistant message with tool_calls)", "content")
        if role == "tool" and not data.get("tool_call_id"):
            raise ValidationError("is required in a tool message: the id of the call it answers", "tool_call_id")

    @post_load
    def flatten(self, data, **kwargs):
        content = data["content"]
        if isinstance(content, list):
            content = "".join(part["text"] for part in content)
        message = {"role": "system" if data["role"] == "developer" else data["role"], "content": content}
        if data["tool_calls"]:
            message["tool_calls"] = [{"id": c["id"], "type": "function", "function": dict(c["function"])}
                                     for c in data["tool_calls"]]
        if data["role"] == "tool":
            message["tool_call_id"] = data["tool_call_id"]
        return message


class JsonSchemaFormat(RequestSchema):
    name = String(load_default="response", validate=validate.Regexp(r"^[A-Za-z0-9_-]{1,64}$"))
    description = optional(String, "Ignored.")
    schema = fields.Dict(required=True, metadata={"description": "The JSON schema the output is valid against."})
    strict = optional(Boolean, "Always in effect: the output is valid by construction.")


class ResponseFormat(RequestSchema):
    type = String(required=True, validate=validate.OneOf(["text", "json_object", "json_schema"]))
    json_schema = fields.Nested(JsonSchemaFormat, allow_none=True, load_default=None)

    @validates_schema
    def schema_with_its_type(self, data, **kwargs):
        if data.get("type") == "json_schema" and data.get("json_schema") is None:
            raise ValidationError("is required with type json_schema", "json_schema")


class FunctionTool(RequestSchema):
    name = String(required=True, validate=validate.Regexp(r"^[A-Za-z0-9_-]{1,64}$", error="must be 1 to 64 "
                                                           "letters, digits, underscores or dashes"))
    description = optional(String, "Shown to the model with the tool.")
    parameters = fields.Dict(allow_none=True, load_default=None,
                             metadata={"description": "A JSON schema of the arguments (default: none)."})
    strict = optional(Boolean, "Always in effect: the arguments are valid by construction.")


class Tool(RequestSchema):
    type = String(required=True, validate=validate.OneOf(["function"]))
    function = fields.Nested(FunctionTool, required=True)


class NamedToolChoice(RequestSchema):
    type = String(required=True, validate=validate.OneOf(["function"]))
    function = fields.Nested(Schema.from_dict({"name": String(required=True)}), required=True)


class StreamOptions(RequestSchema):
    include_usage = optional(Boolean, "Send a last chunk with `choices: []` and the usage.")


class SamplingFields(RequestSchema):
    """The fields chat and completions share: the model, the sampler, stopping, streaming."""

    model = String(allow_none=True, load_default="", metadata={
        "description": "Empty, `default`, or the loaded model's id (see GET /v1/models)."})
    max_tokens = optional(Integer, "Most tokens to generate (default: chat, up to the context window; "
                                   "completions, 16).", validate=validate.Range(min=1))
    max_completion_tokens = optional(Integer, "OpenAI's newer name for max_tokens.", validate=validate.Range(min=1))
    n = Integer(allow_none=True, load_default=None, validate=validate.Range(min=1),
                metadata={"description": "Choices per prompt (default 1); at most the sequences this server decodes "
                                         "at once (refimpl serve --max-seqs, 16 by default)."})
    temperature = optional(Float, "0 to 2 (default 1); 0 is greedy.", validate=validate.Range(min=0, max=2))
    top_p = optional(Float, "Nucleus sampling mass, greater than 0 and at most 1 (default 1).",
                     validate=validate.Range(min=0, max=1, min_inclusive=False))
    top_k = optional(Integer, "Keep the k most likely tokens; 0 or -1 (default) keeps all.",
                     validate=validate.Range(min=-1))
    min_p = optional(Float, "Keep tokens at least min_p times as likely as the top token (0 to 1).",
                     validate=validate.Range(min=0, max=1))
    presence_penalty = optional(Float, "-2 to 2 (default 0).", validate=validate.Range(min=-2, max=2))
    frequency_penalty = optional(Float, "-2 to 2 (default 0).", validate=validate.Range(min=-2, max=2))
    repetition_penalty = optional(Float, "Hugging Face's repetition penalty, greater than 0 (default 1).",
                                  validate=validate.Range(min=0, min_inclusive=False))
    logit_bias = fields.Dict(
        keys=String(validate=validate.Regexp(r"^[0-9]{1,9}$", error="keys must be token ids written as strings")),
        values=Float(validate=validate.Range(min=-100, max=100)),
        allow_none=True, load_default=None, validate=at_most_entries(MAX_LOGIT_BIAS),
        metadata={"description": "Token id (as a string) -> bias from -100 to 100, added to the logits.",
                  "maxProperties": MAX_LOGIT_BIAS})
    seed = optional(Integer, "Seed of this request's random generator: same seed, same tokens.",
                    validate=validate.Range(min=0, max=2**64 - 1))
    stop = Either(string=String(validate=validate.Length(min=1)), integer=token_id(),
                  array=fields.List(Either(string=String(validate=validate.Length(min=1)), integer=token_id()),
                                    validate=validate.Length(max=MAX_STOP)),
                  allow_none=True, load_default=None,
                  metadata={"description": f"Up to {MAX_STOP} stop strings (at most {MAX_STOP_CHARS} characters in "
                                           "all) and/or stop token ids. The text stops before a stop string; a "
                                           "stop token is not part of it."})
    stream = optional(Boolean, "Send server-sent events as the tokens are made.")
    stream_options = fields.Nested(StreamOptions, allow_none=True, load_default=None)
    user = optional(String, "Ignored.")

    @validates_schema
    def one_max_tokens(self, data, **kwargs):
        a, b = data.get("max_tokens"), data.get("max_completion_tokens")
        if a is not None and b is not None and a != b:
            raise ValidationError("max_tokens and max_completion_tokens disagree; give one of them",
                                  "max_completion_tokens")


class ChatCompletionRequest(SamplingFields):
    EXAMPLE = {"model": "default", "messages": [{"role": "user", "content": "Write a haiku about the sea."}],
               "max_tokens": 64, "temperature": 0.7}

    messages = Either(array=fields.List(fields.Nested(ChatMessage), validate=validate.Length(min=1)),
                      string=String(), required=True,
                      metadata={"description": "The conversation; a plain string is one user message."})
    logprobs = optional(Boolean, "Return the log-probability of each generated token.")
    top_logprobs = optional(Integer, f"With logprobs: also the 0 to {MAX_TOP_LOGPROBS} most likely tokens "
                                     "at each position.", validate=validate.Range(min=0, max=MAX_TOP_LOGPROBS))
    response_format = fields.Nested(ResponseFormat, allow_none=True, load_default=None, metadata={
        "description": "text (default), json_object (any JSON object), or json_schema: the output is valid by "
                       "construction (constrained decoding), unless max_tokens cuts it (finish_reason length)."})
    tools = fields.List(fields.Nested(Tool), allow_none=True, load_default=None,
                        validate=validate.Length(max=MAX_TOOLS),
                        metadata={"description": f"Function tools (at most {MAX_TOOLS}): a call's arguments are "
                                                 "valid against its parameters by construction."})
    tool_choice = Either(string=String(validate=validate.OneOf(["none", "auto", "required"])),
                         object=fields.Nested(NamedToolChoice), allow_none=True, load_default=None,
                         metadata={"description": "none, auto (default with tools), required, or "
                                                  '{"type": "function", "function": {"name": ...}}.'})
    parallel_tool_calls = optional(Boolean, "Allow several calls in one reply (default true).")
    functions = Unsupported(([],), "the deprecated functions; use tools")
    function_call = Unsupported(("none",), "the deprecated function_call; use tool_choice")

    @validates_schema
    def top_logprobs_needs_logprobs(self, data, **kwargs):
        if data.get("top_logprobs") and not data.get("logprobs"):
            raise ValidationError("top_logprobs needs logprobs set to true", "top_logprobs")

    @validates_schema
    def tools_named(self, data, **kwargs):
        tools, choice = data.get("tools") or [], data.get("tool_choice")
        names = [tool["function"]["name"] for tool in tools]
        if len(set(names)) < len(names):
            raise ValidationError("two tools have the same name", "tools")
        if isinstance(choice, dict) and choice["function"]["name"] not in names:
            raise ValidationError(f"names the function {choice['function']['name']!r}, which is not in tools",
                                  "tool_choice")
        if choice in ("required",) and not tools:
            raise ValidationError("required needs tools", "tool_choice")

    @post_load
    def as_messages(self, data, **kwargs):
        if isinstance(data["messages"], str):
            data["messages"] = [{"role": "user", "content": data["messages"]}]
        return data


class CompletionRequest(SamplingFields):
    EXAMPLE = {"model": "default", "prompt": "The capital of France is", "max_tokens": 16}

    prompt = Either(
        string=String(),
        array=fields.List(Either(string=String(), integer=token_id(),
                                 array=fields.List(token_id(), validate=validate.Length(min=1))),
                          validate=validate.Length(min=1)),
        required=True,
        metadata={"description": "A string, a list of strings, a list of token ids, or a list of token-id "
                                 f"lists (at most {MAX_PROMPTS} prompts); each prompt gets its own n choices."})
    echo = optional(Boolean, "Put the prompt before the completion (with logprobs: the prompt's too).")
    logprobs = optional(Integer, f"Return log-probabilities, with this many (0 to {MAX_TOP_LOGPROBS}) most "
                                 "likely alternatives per token.", validate=validate.Range(min=0, max=MAX_TOP_LOGPROBS))
    suffix = Unsupported(("",), "insertion")
    best_of = Unsupported((1,), "best_of > 1")

    @post_load
    def as_prompt_list(self, data, **kwargs):
        """Normalise the four OpenAI prompt forms into a list of prompts, each a string or token ids."""
        prompt = data["prompt"]
        if isinstance(prompt, str):
            prompts = [prompt]
        elif all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        elif all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt):
            prompts = prompt
        else:
            raise ValidationError({"prompt": ["an array must hold only strings, only token ids, "
                                              "or only arrays of token ids"]})
        if len(prompts) > MAX_PROMPTS:
            raise ValidationError({"prompt": [f"at most {MAX_PROMPTS} prompts per request"]})
        data["prompt"] = prompts
        return data


class LensOptions(RequestSchema):
    top = Integer(load_default=5, validate=validate.Range(min=1, max=inspection.MAX_TOP),
                  metadata={"description": f"Candidates per position and layer, 1 to {inspection.MAX_TOP} (default 5)."})


def layers_or_heads(what):
    return Either(string=String(validate=validate.OneOf(["all"])),
                  array=fields.List(Integer(validate=validate.Range(min=0)), validate=validate.Length(min=1)),
                  required=True, metadata={"description": f'"all", or a list of {what} numbers (from 0).'})


class AttentionOptions(RequestSchema):
    layers = layers_or_heads("layer")
    heads = layers_or_heads("query head")


class InspectRequest(RequestSchema):
    EXAMPLE = {"model": "default",
               "messages": [{"role": "user", "content": "What is the capital of France?"},
                            {"role": "assistant", "content": "The capital of France is Paris."}],
               "logit_lens": {"top": 3}, "attention": {"layers": [0], "heads": "all"}}

    model = String(allow_none=True, load_default="", metadata={
        "description": "Empty, `default`, or the loaded model's id (see GET /v1/models)."})
    prompt = Either(string=String(validate=validate.Length(min=1)),
                    array=fields.List(token_id(), validate=validate.Length(min=1)), load_default=None,
                    metadata={"description": "Text (tokenized as completions does) or token ids. "
                                             "Give prompt or messages."})
    messages = Either(array=fields.List(fields.Nested(ChatMessage), validate=validate.Length(min=1)),
                      string=String(), load_default=None,
                      metadata={"description": "A conversation, rendered with the chat template; a plain string is "
                                               "one user message."})
    add_generation_prompt = optional(Boolean, "With messages: end with the template's assistant header, as a "
                                              "chat reply's prompt does (default false).")
    positions = fields.List(Integer(validate=validate.Range(min=0)), validate=validate.Length(min=1),
                            allow_none=True, load_default=None,
                            metadata={"description": "Only these positions (0-based) in logit_lens and attention "
                                                     "(default: every position)."})
    logit_lens = fields.Nested(LensOptions, allow_none=True, load_default=None, metadata={
        "description": "Ask for the logit lens: what each layer's residual stream predicts at each position."})
    attention = fields.Nested(AttentionOptions, allow_none=True, load_default=None, metadata={
        "description": "Ask for the attention weights of these layers x heads."})

    @validates_schema
    def prompt_or_messages(self, data, **kwargs):
        if (data.get("prompt") is None) == (data.get("messages") is None):
            raise ValidationError("give either prompt or messages", "prompt")
        if data.get("add_generation_prompt") and data.get("messages") is None:
            raise ValidationError("add_generation_prompt needs messages", "add_generation_prompt")

    @post_load
    def as_messages(self, data, **kwargs):
        if isinstance(data["messages"], str):
            data["messages"] = [{"role": "user", "content": data["messages"]}]
        return data


# --- Responses ------------------------------------------------------------------------------

class ResponseSchema(Schema):
    """Response fields are dumped in declaration order, which is OpenAI's."""


def req(field_class, *args, **kwargs):
    """A response field that is always present (documented as required)."""
    return field_class(*args, required=True, **kwargs)


def nullable(field_class, *args, **kwargs):
    return field_class(*args, required=True, allow_none=True, **kwargs)


class CompletionUsage(ResponseSchema):
    prompt_tokens = req(fields.Integer)
    completion_tokens = req(fields.Integer, metadata={"description": "Includes the end-of-sequence token."})
    total_tokens = req(fields.Integer)
    avg_tok_per_sec = req(fields.Float, metadata={"description": "All tokens over prefill plus decode time."})
    avg_prompt_tok_per_sec = req(fields.Float, metadata={"description": "Prompt tokens over prefill time."})
    avg_compl_tok_per_sec = req(fields.Float, metadata={"description": "Generated tokens over decode time."})


class TopLogprob(ResponseSchema):
    token = req(fields.String, metadata={"description": "U+FFFD where the token holds part of a character."})
    logprob = req(fields.Float)
    bytes = req(fields.List, fields.Integer(), metadata={"description": "The token's exact UTF-8 bytes."})


class TokenLogprob(TopLogprob):
    top_logprobs = req(fields.List, fields.Nested(TopLogprob))


class ChatLogprobs(ResponseSchema):
    content = nullable(fields.List, fields.Nested(TokenLogprob))


class ResponseFunctionCall(ResponseSchema):
    name = req(fields.String)
    arguments = req(fields.String, metadata={"description": "The arguments as a JSON text, valid against the "
                                                            "function's parameters."})


class ResponseToolCall(ResponseSchema):
    id = req(fields.String)
    type = req(fields.String, metadata={"description": "function"})
    function = req(fields.Nested, ResponseFunctionCall)


class ResponseMessage(ResponseSchema):
    role = req(fields.String)
    content = nullable(fields.String, metadata={"description": "null when the reply is only tool calls."})
    tool_calls = fields.List(fields.Nested(ResponseToolCall), metadata={"description": "When the model calls tools."})


class ChatChoice(ResponseSchema):
    index = req(fields.Integer)
    message = req(fields.Nested, ResponseMessage)
    logprobs = nullable(fields.Nested, ChatLogprobs)
    finish_reason = req(fields.String, validate=validate.OneOf(["stop", "length", "tool_calls"]))


class CompletionMeta(ResponseSchema):
    id = req(fields.String)
    object = req(fields.String)
    created = req(fields.Integer, metadata={"description": "Unix time in seconds."})
    model = req(fields.String)
    system_fingerprint = req(fields.String)


class ChatCompletionResponse(CompletionMeta):
    choices = req(fields.List, fields.Nested(ChatChoice))
    usage = req(fields.Nested, CompletionUsage)


class DeltaFunctionCall(ResponseSchema):
    name = fields.String(metadata={"description": "In a call's first chunk only."})
    arguments = fields.String(metadata={"description": "The next fragment of the arguments' JSON text."})


class DeltaToolCall(ResponseSchema):
    index = req(fields.Integer, metadata={"description": "Which call of the message this fragment belongs to."})
    id = fields.String(metadata={"description": "In a call's first chunk only."})
    type = fields.String(metadata={"description": "function, in a call's first chunk only."})
    function = fields.Nested(DeltaFunctionCall)


class ChatDelta(ResponseSchema):
    role = fields.String(metadata={"description": "In each choice's first chunk only."})
    content = fields.String(allow_none=True)
    tool_calls = fields.List(fields.Nested(DeltaToolCall))


class ChatChunkChoice(ResponseSchema):
    index = req(fields.Integer)
    delta = req(fields.Nested, ChatDelta)
    logprobs = nullable(fields.Nested, ChatLogprobs)
    finish_reason = nullable(fields.String)


class ChatCompletionChunk(CompletionMeta):
    """One server-sent event of a streamed chat completion (object chat.completion.chunk)."""
    choices = req(fields.List, fields.Nested(ChatChunkChoice))
    usage = fields.Nested(CompletionUsage, allow_none=True, metadata={
        "description": "With stream_options.include_usage: null in every chunk but the last, whose choices are []."})


class LegacyLogprobs(ResponseSchema):
    tokens = req(fields.List, fields.String())
    token_logprobs = req(fields.List, fields.Float(allow_none=True),
                         metadata={"description": "null for the first prompt token (it has no prefix)."})
    top_logprobs = req(fields.List, fields.Dict(keys=fields.String(), values=fields.Float(), allow_none=True))
    text_offset = req(fields.List, fields.Integer())


class CompletionChoice(ResponseSchema):
    index = req(fields.Integer, metadata={"description": "prompt index * n + choice index"})
    text = req(fields.String)
    logprobs = nullable(fields.Nested, LegacyLogprobs)
    finish_reason = nullable(fields.String, metadata={"description": "null in streamed chunks until the last."})


class CompletionResponse(CompletionMeta):
    """A completion, and also each streamed chunk of one (OpenAI uses text_completion for both)."""
    choices = req(fields.List, fields.Nested(CompletionChoice))
    usage = fields.Nested(CompletionUsage, allow_none=True)


class Model(ResponseSchema):
    id = req(fields.String)
    object = req(fields.String)
    created = req(fields.Integer)
    owned_by = req(fields.String)
    architecture = req(fields.String, metadata={"description": "config.json's model_type: the model's family "
                                                               "(llama, mistral, qwen2, ...)."})
    max_model_len = req(fields.Integer, metadata={"description": "The context window, in tokens (as vLLM reports it)."})


class ModelList(ResponseSchema):
    object = req(fields.String)
    data = req(fields.List, fields.Nested(Model))


class Health(ResponseSchema):
    status = req(fields.String)
    model = req(fields.String)


class ErrorDetail(ResponseSchema):
    message = req(fields.String)
    type = req(fields.String)
    param = nullable(fields.String)
    code = nullable(fields.String)


class ErrorResponse(ResponseSchema):
    """OpenAI's error envelope: every error this server returns has this shape."""
    error = req(fields.Nested, ErrorDetail)


class LensCandidate(ResponseSchema):
    token_id = req(fields.Integer)
    token = req(fields.String)
    logprob = req(fields.Float)


class LensNextToken(LensCandidate):
    rank = req(fields.Integer, metadata={"description": "1: this layer's most likely token."})


class LensLayer(ResponseSchema):
    layer = req(fields.Integer, metadata={"description": "0: the embeddings; L (num_hidden_layers): after the last "
                                                         "block, the model's own distribution."})
    top = req(fields.List, fields.Nested(LensCandidate))
    next_token = nullable(fields.Nested, LensNextToken,
                          metadata={"description": "The token that comes next in the prompt; null at the last position."})
    entropy = req(fields.Float, metadata={"description": "Of this layer's whole distribution, in nats."})


class AttentionHead(ResponseSchema):
    layer = req(fields.Integer)
    head = req(fields.Integer, metadata={"description": "A query head, numbered as transformers' output_attentions."})
    weights = req(fields.List, fields.List(fields.Float()),
                  metadata={"description": "One row per position asked for: row p holds the p + 1 softmax weights of "
                                           "query p over positions 0..p (zeros outside a sliding window), rounded to "
                                           "6 decimals."})


class InspectUsage(ResponseSchema):
    prompt_tokens = req(fields.Integer)
    total_tokens = req(fields.Integer)


class InspectResponse(ResponseSchema):
    object = req(fields.String, metadata={"description": "inspection"})
    model = req(fields.String)
    text = req(fields.String, metadata={"description": "The prompt as the model reads it (the rendered chat template)."})
    token_ids = req(fields.List, fields.Integer())
    tokens = req(fields.List, fields.String(), metadata={"description": "Each token's text (U+FFFD where it holds "
                                                                          "part of a character; special tokens as "
                                                                          "their markers)."})
    special = req(fields.List, fields.Boolean(), metadata={"description": "Whether each token is a control token "
                                                                           "such as <|im_start|> (it adds no text)."})
    logprobs = req(fields.List, fields.Float(allow_none=True),
                   metadata={"description": "log p(token t | tokens before it); null for the first."})
    message_tokens = nullable(fields.List, fields.List(fields.Integer()),
                              metadata={"description": "With messages: [start, end) of each message's turn in "
                                                       "token_ids; null otherwise."})
    positions = req(fields.List, fields.Integer(), metadata={"description": "The positions logit_lens and "
                                                                            "attention rows are given for."})
    logit_lens = nullable(fields.List, fields.List(fields.Nested(LensLayer)),
                          metadata={"description": "Per position asked for, per layer 0..L."})
    attention = nullable(fields.List, fields.Nested(AttentionHead))
    usage = req(fields.Nested, InspectUsage)
