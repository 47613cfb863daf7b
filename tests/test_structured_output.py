"""Structured output and tool calls on the real server (the default model), through the official
openai client: response_format json_object / json_schema, client.chat.completions.parse, tools and
tool_choice, streamed tool-call deltas, tool results in the history, and the requests refused.

What constrained decoding promises is checked as the user sees it: every choice that finished by
itself ("stop", or "tool_calls") is valid against its schema. The prompts and schemas are chosen so
that the small model closes its JSON well within max_tokens; a choice cut by max_tokens
("length") may stop anywhere and is only counted. One server serves the module; generations are
kept short (the model decodes about 20 tokens a second on a development machine).
"""

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from server_helpers import LiveServer


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    live = LiveServer(default_model_dir, log_path=tmp_path_factory.mktemp("structured") / "server.log")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="EMPTY", max_retries=0, timeout=300)


def user(text):
    return [{"role": "user", "content": text}]


def json_schema(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def closed(properties, required=None):
    """An object schema with exactly these properties, all required unless said otherwise."""
    return {"type": "object", "properties": properties, "required": list(required or properties),
            "additionalProperties": False}


SHIRT = closed({"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["small", "large"]}})
SHIRT_PROMPT = "Pick a color and a size for a t-shirt."

SCHEMAS = {  # (prompt, schema), from easy to harder
    "enums": (SHIRT_PROMPT, SHIRT),
    "array_bounds": ("List two or three fruits.", closed({"fruits": {
        "type": "array", "items": {"enum": ["apple", "banana", "cherry", "grape"]}, "minItems": 2, "maxItems": 3}})),
    "nested_required": ("Describe a person with a name and an age.", closed({"person": closed({
        "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}})})),
    "string_pattern": ("Make up a flight code like ABC-12.",
                       closed({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}})),
    "number_bounds": ("Give a temperature in Celsius and a probability.", closed({
        "celsius": {"type": "integer", "minimum": -10, "maximum": 40},
        "probability": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}})),
}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": closed({"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}})}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the current local time in a city",
    "parameters": closed({"city": {"type": "string", "maxLength": 20}})}}
TOOLS = [WEATHER, TIME]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
WEATHER_QUESTION = user("What is the weather in Paris?")


def finished_valid(choices, schema):
    """Validate every choice that finished by itself; return how many did."""
    done = [c for c in choices if c.finish_reason == "stop"]
    for choice in done:
        assert choice.message.tool_calls is None
        jsonschema.validate(json.loads(choice.message.content), schema)
    for choice in choices:
        assert choice.finish_reason in ("stop", "length")
    return len(done)


def assert_valid_calls(calls, names=PARAMETERS):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
    assert len({call.id for call in calls}) == len(calls)


# ---------------------------------------------------------------- response_format


def test_json_object(client):
    completion = client.chat.completions.create(
        model="", messages=user("Give me a JSON object describing a cat with its name and age."),
        response_format={"type": "json_object"}, max_tokens=60, temperature=0.8, seed=1, n=2)
    assert len(completion.choices) == 2
    done = 0
    for choice in completion.choices:
        assert choice.finish_reason in ("stop", "length")
        assert choice.message.content.startswith("{")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
            done += 1
    assert done >= 1


@pytest.mark.parametrize("kind", SCHEMAS)
def test_json_schema(client, kind):
    """Three sampled choices (n=3, each its own random stream) per schema."""
    prompt, schema = SCHEMAS[kind]
    completion = client.chat.completions.create(model="", messages=user(prompt), response_format=json_schema(schema),
                                                max_tokens=60, temperature=0.9, seed=3, n=3)
    assert len(completion.choices) == 3
    assert finished_valid(completion.choices, schema) >= 2


def test_parse_into_a_pydantic_model(client):
    class Shirt(BaseModel):
        color: Literal["red", "green", "blue"]
        size: Literal["small", "large"]

    completion = client.chat.completions.parse(model="", messages=user(SHIRT_PROMPT), response_format=Shirt,
                                               max_tokens=30, temperature=0.7, seed=0)
    (choice,) = completion.choices
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Shirt)
    assert choice.message.parsed == Shirt.model_validate_json(choice.message.content)


def test_streamed_json_with_two_choices(client):
    prompt, schema = SCHEMAS["nested_required"]
    chunks = list(client.chat.completions.create(model="", messages=user(prompt), response_format=json_schema(schema),
                                                 max_tokens=40, temperature=0.8, seed=5, n=2, stream=True))
    texts, finish = {0: "", 1: ""}, {}
    for chunk in chunks:
        (choice,) = chunk.choices
        assert choice.delta.tool_calls is None
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            assert choice.index not in finish
            finish[choice.index] = choice.finish_reason
    assert set(finish) == {0, 1} and set(finish.values()) <= {"stop", "length"}
    done = [i for i in finish if finish[i] == "stop"]
    assert done
    for i in done:
        jsonschema.validate(json.loads(texts[i]), schema)


def test_logprobs_are_the_models_raw_distribution(client):
    """The grammar forces the first token to open the object, but the log-probabilities reported are
    the model's own: the same as without a grammar, where it would rather have begun with a word."""
    request = dict(model="", messages=user(SHIRT_PROMPT), temperature=0, logprobs=True, top_logprobs=5)
    constrained = client.chat.completions.create(**request, response_format=json_schema(SHIRT), max_tokens=30)
    plain = client.chat.completions.create(**request, max_tokens=1)
    (choice,) = constrained.choices
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), SHIRT)
    content = choice.logprobs.content
    assert b"".join(bytes(t.bytes) for t in content).decode() == choice.message.content
    first, unconstrained = content[0], plain.choices[0].logprobs.content[0]
    assert first.token.startswith("{")
    assert [t.token for t in first.top_logprobs] == [t.token for t in unconstrained.top_logprobs]
    assert [t.logprob for t in first.top_logprobs] == pytest.approx([t.logprob for t in unconstrained.top_logprobs],
                                                                    abs=1e-4)
    # The model did not want "{" first: the words it preferred are what the grammar forbade.
    assert not any(t.token.startswith("{") for t in first.top_logprobs)
    assert first.logprob < first.top_logprobs[0].logprob - 1
    for entry in content:  # raw, not renormalised over the allowed tokens
        assert entry.logprob <= entry.top_logprobs[0].logprob
        assert sum(2.718281828459045 ** t.logprob for t in entry.top_logprobs) <= 1 + 1e-9


# ---------------------------------------------------------------- tools


@pytest.fixture(scope="module")
def weather_call(client):
    return client.chat.completions.create(model="", messages=WEATHER_QUESTION, tools=TOOLS, tool_choice="required",
                                          parallel_tool_calls=False, max_tokens=60, temperature=0.7, seed=0)


def test_required_tool_call(weather_call):
    (choice,) = weather_call.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and choice.message.role == "assistant"
    assert len(choice.message.tool_calls) == 1  # parallel_tool_calls false: one call
    assert_valid_calls(choice.message.tool_calls)


def test_named_tool_choice(client):
    completion = client.chat.completions.create(
        model="", messages=WEATHER_QUESTION, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False, max_tokens=50, temperature=0.7, seed=0)
    (choice,) = completion.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert_valid_calls([call], names={"get_time"})


def test_tool_choice_none_leaves_the_tools_out(client, weather_call):
    completion = client.chat.completions.create(model="", messages=WEATHER_QUESTION, tools=TOOLS, tool_choice="none",
                                                max_tokens=6, temperature=0.7, seed=0)
    (choice,) = completion.choices
    assert choice.message.tool_calls is None and isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens < weather_call.usage.prompt_tokens  # no tool descriptions in the prompt


def test_tool_choice_auto(client):
    completion = client.chat.completions.create(model="", messages=WEATHER_QUESTION, tools=TOOLS, tool_choice="auto",
                                                max_tokens=30, temperature=0.7, seed=1)
    (choice,) = completion.choices
    message = choice.message
    if message.tool_calls:  # either calls, valid ones...
        assert choice.finish_reason in ("tool_calls", "length")
        if choice.finish_reason == "tool_calls":
            assert message.content is None
        assert_valid_calls(message.tool_calls)
    else:  # ...or plain text, which does not begin like a call
        assert isinstance(message.content, str) and not message.content.startswith("<tool_call>")
        assert choice.finish_reason in ("stop", "length")


def test_streamed_parallel_tool_calls(client):
    stream = client.chat.completions.create(
        model="", messages=user("What is the weather in Paris and the time in Tokyo?"), tools=TOOLS,
        tool_choice="required", max_tokens=90, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    calls, finish = {}, []
    for chunk in chunks[1:]:
        (choice,) = chunk.choices
        assert not choice.delta.content  # only calls
        if choice.finish_reason:
            finish.append(choice.finish_reason)
        for delta in choice.delta.tool_calls or []:
            if delta.index not in calls:  # a call's first delta: index, id, type, name, no arguments yet
                assert delta.index == len(calls)
                assert delta.id.startswith("call_") and delta.type == "function"
                assert delta.function.name in PARAMETERS and delta.function.arguments == ""
                calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
            else:  # then only fragments of the arguments
                assert delta.id is None and delta.type is None and delta.function.name is None
                assert delta.function.arguments
                calls[delta.index]["arguments"] += delta.function.arguments
    assert finish == ["tool_calls"] and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert len(calls) >= 1
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), PARAMETERS[call["name"]])
    assert len({call["id"] for call in calls.values()}) == len(calls)


def test_a_conversation_continues_after_a_tool_result(client, weather_call):
    message = weather_call.choices[0].message  # sent back as the client returned it, content None
    messages = [*WEATHER_QUESTION, message,
                {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": '{"temperature": 21}'}]
    completion = client.chat.completions.create(model="", messages=messages, tools=TOOLS, max_tokens=12, temperature=0)
    (choice,) = completion.choices
    assert completion.usage.prompt_tokens > weather_call.usage.prompt_tokens  # the call and its result were read
    if choice.message.tool_calls:
        assert_valid_calls(choice.message.tool_calls)
    else:
        assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length", "tool_calls")


# ---------------------------------------------------------------- refused


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def refused(client, param, **request):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="", max_tokens=1, **request)
    assert err.value.status_code == 400
    body = err.value.body
    assert body["type"] == "invalid_request_error" and body["param"] == param, body
    return body["message"]


def test_malformed_history_is_refused_naming_the_message(client):
    called = {"role": "assistant", "content": None, "tool_calls": [CALL]}
    message = refused(client, "messages[2].tool_call_id", messages=[*WEATHER_QUESTION, called,
                                                                    {"role": "tool", "content": "21"}])
    assert message.startswith("messages[2].tool_call_id")
    refused(client, "messages[1].content", messages=[*WEATHER_QUESTION, {"role": "assistant", "content": None},
                                                     *WEATHER_QUESTION])
    refused(client, "messages[0].tool_calls", messages=[{"role": "user", "content": "Hi", "tool_calls": [CALL]}])


def test_schemas_the_grammar_engine_cannot_compile_are_refused(client):
    bad = {"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}
    message = refused(client, "response_format.json_schema.schema", messages=WEATHER_QUESTION,
                      response_format=json_schema(bad))
    assert "uniqueItems" in message
    tool = {"type": "function", "function": {"name": "f", "parameters": bad}}
    assert "uniqueItems" in refused(client, "tools", messages=WEATHER_QUESTION, tools=[tool], tool_choice="required")


def test_inconsistent_tool_and_format_requests_are_refused(client):
    refused(client, "tool_choice", messages=WEATHER_QUESTION, tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_stock_price"}})
    refused(client, "tool_choice", messages=WEATHER_QUESTION, tool_choice="required")
    refused(client, "response_format.json_schema", messages=WEATHER_QUESTION, response_format={"type": "json_schema"})
    refused(client, "response_format.type", messages=WEATHER_QUESTION, response_format={"type": "xml"})
    refused(client, "response_format", messages=WEATHER_QUESTION, tools=TOOLS, tool_choice="auto",
            response_format={"type": "json_object"})
    refused(client, "response_format", messages=WEATHER_QUESTION, tools=TOOLS,  # auto is the default with tools
            response_format=json_schema(SHIRT))
