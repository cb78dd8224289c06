"""Read a generated assistant turn back into content, reasoning and tool calls.

The inverse of the templates' rendering (a round-trip test holds each template to that):

- qwen, chatml (Hermes): ``[<think>...</think>] content <tool_call>{"name", "arguments"}</tool_call>*``
- chatml_kv: ``<tool_call>name\nkey: value...</tool_call>``, each value JSON where it reads as
  JSON, else the text itself (the Hermes JSON form is read too)
- llama3: a bare ``{"name": ..., "parameters": {...}}`` turn (optionally after ``<|python_tag|>``)
- react: ``Thought: ... Action: name / Action Input: {...}`` (possibly several), or ``Final Answer: ...``

Arguments are JSON; ms-agent's Python-dict ``Action Input`` is read with ``ast.literal_eval``
(``agenttune.data.react.parse_arguments``), never ``eval``. A turn that tries to call a tool but
cannot be read is returned with ``error`` set, so the agent loop can show the model its mistake.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from agenttune.data.react import ReActError, parse_step
from agenttune.data.schema import ToolCall, canonical_json

_HERMES_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.S)
_ACTION_LINE = re.compile(r"^Action:", re.M)


@dataclass
class Reply:
    content: str
    """What the user should read: the text outside tool calls (react: the final answer, if any)."""
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning: str | None = None
    final_answer: str | None = None
    """react: the ``Final Answer:`` text (None for text without ReAct keywords); other templates:
    the content of a turn without calls."""
    error: str | None = None
    """Why a tool call could not be read; the turn then counts as malformed."""
    text: str = ""
    """The generated text as it was."""

    @property
    def ok(self) -> bool:
        return self.error is None


def _call_from_json(body: str, arguments_key: str) -> ToolCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as err:
        raise ValueError(f"the tool call is not valid JSON ({err.msg} at char {err.pos}): {body[:120]!r}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        raise ValueError(f'a tool call must be an object with a "name": {body[:120]!r}')
    args = obj.get(arguments_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # OpenAI spelling: arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise ValueError(f"the arguments of {obj['name']} are a string that is not JSON: {args[:80]!r}") from None
    if not isinstance(args, dict):
        raise ValueError(f"the arguments of {obj['name']} must be a JSON object, got {type(args).__name__}")
    return ToolCall(name=obj["name"], arguments=canonical_json(args))


def _reject_constant(name: str):
    raise ValueError(name)  # NaN and Infinity are not JSON


def _read_kv_value(raw: str, key: str, name: str):
    """A value as :func:`agenttune.data.templates._kv_call` writes it: JSON where it reads as JSON,
    else the text itself."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except ValueError as err:
        if raw[:1] in ('"', "[", "{"):
            raise ValueError(f"the value of {key!r} in the call of {name} starts as JSON but is not JSON "
                             f"({getattr(err, 'msg', err)}): {raw[:80]!r}") from None
        return raw


def _call_from_lines(body: str) -> ToolCall:
    """chatml_kv: the function's name on the first line, then one ``key: value`` line per argument.
    A body that opens with ``{`` is read as Hermes JSON."""
    if body.startswith("{"):
        return _call_from_json(body, "arguments")
    name, *lines = body.split("\n")
    name = name.strip()
    if not name or " " in name or ":" in name:
        raise ValueError(f"a tool call must start with the function's name on its own line: {body[:120]!r}")
    args: dict = {}
    for line in lines:
        key, sep, raw = line.partition(":")  # keys hold no colon; the blank after it may be missing
        if not sep or not key:
            raise ValueError(f"the call of {name} has a line that is not `argument: value`: {line[:80]!r}")
        raw = raw.removeprefix(" ")
        if key in args:
            raise ValueError(f"the call of {name} gives {key!r} twice")
        args[key] = _read_kv_value(raw, key, name)
    return ToolCall(name=name, arguments=canonical_json(args))


def parse_kv(text: str) -> Reply:
    return parse_hermes(text, _call_from_lines)


def parse_hermes(text: str, read_call=None) -> Reply:
    reasoning = None
    body = text
    think = _THINK.match(body)
    if think:
        reasoning, body = think.group(1).strip("\n"), body[think.end() :]
    start = body.find("<tool_call>")
    if start == -1:
        content = body.strip()
        return Reply(content=content, reasoning=reasoning, final_answer=content, text=text)
    calls, error = [], None
    for match in _HERMES_CALL.finditer(body, start):
        try:
            inner = match.group(1).strip(" \t\r\n")
            calls.append(read_call(inner) if read_call else _call_from_json(inner, "arguments"))
        except ValueError as err:
            error = str(err)
            break
    return Reply(content=body[:start].strip(), tool_calls=calls if error is None else [], reasoning=reasoning,
                 error=error, text=text)


def parse_llama3(text: str) -> Reply:
    body = text.removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return Reply(content=body, final_answer=body, text=text)
    try:
        call = _call_from_json(body, "parameters")
    except ValueError as err:
        return Reply(content="", error=str(err), text=text)
    return Reply(content="", tool_calls=[call], text=text)


def parse_react(text: str) -> Reply:
    """One ReAct step (the text before ``Observation:``). Several ``Action:`` blocks in one step
    are parallel calls, each read on its own."""
    starts = [m.start() for m in _ACTION_LINE.finditer(text)]
    try:
        if not starts:
            step = parse_step(text)
            if step.final_answer is not None:
                return Reply(content=step.final_answer, final_answer=step.final_answer, reasoning=step.thought, text=text)
            return Reply(content=text.strip(), text=text)  # no ReAct keyword: not an answer in this grammar
        thought = parse_step(text[: starts[0]]).text.strip()
        thought = thought.removeprefix("Thought:").strip() or None
        calls = []
        for begin, end in zip(starts, starts[1:] + [len(text)]):
            step = parse_step(text[begin:end])
            calls.append(step.call)
        return Reply(content=thought or "", tool_calls=calls, reasoning=thought, text=text)
    except ReActError as err:
        return Reply(content="", error=str(err), text=text)


PARSERS = {"qwen": parse_hermes, "chatml": parse_hermes, "chatml_compact": parse_hermes, "chatml_kv": parse_kv,
           "llama3": parse_llama3, "react": parse_react}


def parse_reply(template: str, text: str) -> Reply:
    return PARSERS[template](text)

