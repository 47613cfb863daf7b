"""Structured output and tool calls for chat completions: what the model is told, the grammar it
decodes under (refimpl/grammar.py), and how its text is read back as OpenAI's tool_calls.

- response_format json_object / json_schema: the reply is decoded under the schema's grammar.
- tools: the model sees them the way its chat template expects (the template's `tools` variable),
  or, for a template without one (SmolLM2's), in a system message in the style of Hermes' function
  calling, which asks for each call as <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>.
  Decoding is constrained to that form, with arguments valid against the function's parameters:
  tool_choice "required" or a named function allows only calls; "auto" also plain text (which may
  not begin like a call); "none" leaves the tools out. parallel_tool_calls false allows one call.
- A reply is read back: its calls become message.tool_calls (content null when there is nothing
  else), finish_reason "tool_calls"; streamed, they go out as OpenAI streams them (CallDeltas).
- History: an assistant message's tool_calls and the tool messages answering them are rendered
  through the template, or, without template support, as the same <tool_call> text and
  <tool_response> messages the system message describes.
"""

import json
import re
import secrets

from refimpl.grammar import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, GrammarError

from webapp.errors import ApiError

NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}

# The system message of Hermes 2 Pro's function calling (NousResearch), for templates without tools.
SYSTEM_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
    "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions "
    "about what values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\n"
    "For each function call return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags as follows:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-dict>}}\n</tool_call>')


def active_tools(body):
    """{name: parameters schema} of the tools the model may call now, and whether it must call one."""
    tools, choice = body["tools"] or [], body["tool_choice"]
    if not tools or choice == "none":
        return {}, False
    if isinstance(choice, dict):
        tools = [t for t in tools if t["function"]["name"] == choice["function"]["name"]]
    return {t["function"]["name"]: t["function"]["parameters"] or NO_PARAMETERS for t in tools}, \
        choice is not None and choice != "auto"


def grammar_for(body, tools, required, grammars):
    """The grammar the reply decodes under (refimpl.grammar.Grammar), or None; 400 if it cannot compile.
    tools, required: active_tools(body)."""
    response_format = body["response_format"] or {"type": "text"}
    if tools and response_format["type"] != "text":
        raise ApiError(400, "response_format: a JSON response format and tool calls cannot be combined; "
                            "set tool_choice to none, or leave response_format out", "response_format", "invalid_value")
    try:
        if tools:
            parallel = body["parallel_tool_calls"] is not False
            return grammars.tool_calls(tools, required, parallel)
        if response_format["type"] == "json_object":
            return grammars.json_object()
        if response_format["type"] == "json_schema":
            return grammars.json_schema(response_format["json_schema"]["schema"])
    except GrammarError as error:
        param = "tools" if tools else "response_format.json_schema.schema"
        raise ApiError(400, f"{param}: the grammar engine cannot compile this schema: {error}", param,
                       "invalid_value") from None
    return None


def prompt_messages(body, tools, tokenizer):
    """(messages, tools) to render: the template's own tools, or the system message of SYSTEM_PROMPT.
    tools: the active ones ({name: parameters})."""
    listed = [t for t in body["tools"] or [] if t["function"]["name"] in tools]
    if tokenizer.template_takes_tools:
        return [with_parsed_arguments(m) for m in body["messages"]], listed or None
    messages = [as_text(m) for m in body["messages"]]
    if listed:
        described = SYSTEM_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in listed))
        if messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{described}"}
        else:
            messages.insert(0, {"role": "system", "content": described})
    return messages, None


def with_parsed_arguments(message):
    """HF templates read a call's arguments as a mapping (they write it with tojson)."""
    if "tool_calls" not in message:
        return message
    calls = [{**c, "function": {**c["function"], "arguments": parsed(c["function"]["arguments"])}}
             for c in message["tool_calls"]]
    return {**message, "tool_calls": calls}


def parsed(arguments):
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def as_text(message):
    """A message as plain text for a template without tool support (content a string, roles kept)."""
    if "tool_calls" in message:
        calls = "\n".join(call_text(c["function"]["name"], parsed(c["function"]["arguments"]))
                          for c in message["tool_calls"])
        return {"role": "assistant", "content": f"{message['content']}\n{calls}" if message["content"] else calls}
    if message["role"] == "tool":
        return {"role": "tool", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
    return message


def call_text(name, arguments):
    return TOOL_CALL_OPEN + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + TOOL_CALL_CLOSE


def split_calls(text):
    """(content, tool_calls) of a finished reply, read the way CallDeltas reads a stream, so that a
    streamed reply and a whole one agree: calls when the text begins with one (content None then),
    a call cut by max_tokens kept with the arguments written so far; else the text as content."""
    stream = CallDeltas()
    calls = []
    for delta in stream.push(text) + stream.finish():
        for part in delta.get("tool_calls", []):
            if part["index"] == len(calls):
                calls.append({"id": part["id"], "type": "function",
                              "function": {"name": part["function"]["name"], "arguments": ""}})
            calls[part["index"]]["function"]["arguments"] += part["function"]["arguments"]
    return (None, calls) if calls else (text, None)


def new_call_id():
    return f"call_{secrets.token_hex(12)}"


class CallDeltas:
    """One streamed choice's text, turned into chat deltas as it comes: content, or tool calls.

    The grammar writes a call as <tool_call>\\n{"name": "NAME", "arguments": ARGS}\\n</tool_call> (compact
    JSON, keys in that order), calls one per line, and plain text never holds one. So text is
    held only while it could still be the start of a call; a call's first delta carries its index,
    id and name once the name is complete, then each delta the next fragment of ARGS, holding back
    what could be the start of the call's end."""

    HEAD = re.compile(r'\{"name": "((?:[^"\\]|\\.)*)", "arguments": ')
    END = "}" + TOOL_CALL_CLOSE

    def __init__(self):
        self.text, self.mode, self.calls = "", None, 0  # mode: None (undecided), "content" or "calls"
        self.at, self.in_call, self.args_sent = 0, False, 0

    def push(self, delta):
        """The deltas (dicts) that text `delta` releases."""
        self.text += delta
        if self.mode is None:
            opening = TOOL_CALL_OPEN.strip()
            if opening.startswith(self.text) or self.text.startswith(opening):
                if not self.text.startswith(opening):
                    return []
                self.mode = "calls"
            else:
                self.mode = "content"
                return [{"content": self.text}]
        if self.mode == "content":
            return [{"content": delta}] if delta else []
        return self.call_deltas()

    def call_deltas(self):
        out = []
        while True:
            if not self.in_call:
                start = self.text.find(TOOL_CALL_OPEN, self.at)
                match = self.HEAD.match(self.text, start + len(TOOL_CALL_OPEN)) if start >= 0 else None
                if match is None:
                    return out
                self.in_call, self.at, self.args_sent = True, match.end(), 0
                out.append({"tool_calls": [{"index": self.calls, "id": new_call_id(), "type": "function",
                                            "function": {"name": json.loads(f'"{match.group(1)}"'),
                                                         "arguments": ""}}]})
            args = self.text[self.at:]
            end = args.find(self.END)
            if end >= 0:
                fragment = args[self.args_sent:end]
                self.in_call, self.at = False, self.at + end + len(self.END)
                self.calls += 1
            else:
                keep = held_back(args, self.END)
                fragment = args[self.args_sent:len(args) - keep]
                self.args_sent = len(args) - keep
            if fragment:
                out.append({"tool_calls": [{"index": self.calls - (0 if self.in_call else 1),
                                            "function": {"arguments": fragment}}]})
            if self.in_call:
                return out

    def finish(self):
        """The deltas still held at the end of the reply: text that only looked like a call's start, or
        a call cut (by max_tokens) before its name was complete."""
        if (self.mode is None or (self.mode == "calls" and self.calls == 0 and not self.in_call)) and self.text:
            return [{"content": self.text}]
        return []


def held_back(text, end):
    """The length of the longest tail of text that is a prefix of `end` (it may still become it)."""
    for n in range(min(len(text), len(end) - 1), 0, -1):
        if end.startswith(text[-n:]):
            return n
    return 0
