"""Readers: every input format -> :class:`Conversation`.

Each reader takes one decoded record and returns a Conversation or raises DataError.
``read_file`` streams a file, detects its format and yields conversations or errors, each
tagged with the record's origin (``path:line``), so problems point at the line to fix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from .react import ReActError, has_react_keywords, has_react_trace, parse_arguments, parse_step, split_observations
from .schema import ROLES, Conversation, DataError, Message, ToolCall, canonical_json

_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.S)
_API_LIST_MARK = "You have access to the following APIs:"
_API_LINE = re.compile(
    r"^\d+\.\s*([^\s:]+):\s*Call this tool to interact with the .*? API\. "
    r"What is the .*? API useful for\?\s*(.*?)\s*Parameters:\s*",
    re.M,
)


# ---------------------------------------------------------------------------- helpers


def _err(origin: str, reason: str, hint: str = "", kind: str = "invalid") -> DataError:
    return DataError(origin, reason, hint, kind)


def _split_think(text: str) -> tuple[str | None, str]:
    m = _THINK.match(text)
    if not m:
        return None, text
    return m.group(1).strip() or None, text[m.end() :]


def _normalize_tool(tool, origin: str) -> dict:
    """OpenAI ``{"type": "function", "function": {...}}`` or a bare schema -> bare schema."""
    if isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict):
        tool = tool["function"]
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        raise _err(origin, f"a tool definition has no name: {str(tool)[:80]}",
                   'each tool must look like {"name": ..., "description": ..., "parameters": {...}}', "bad_tools")
    return tool


def _parse_tools(value, origin: str) -> list[dict]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _err(origin, f"`tools` is not valid JSON ({e.msg})", "it must be a JSON list of tool schemas",
                       "bad_tools") from None
    if not isinstance(value, list):
        raise _err(origin, "`tools` must be a list of tool schemas", kind="bad_tools")
    return [_normalize_tool(t, origin) for t in value]


def _call_from_obj(obj, origin: str) -> ToolCall:
    """``{"name": ..., "arguments": {...} or "<json>"}`` -> ToolCall with canonical arguments."""
    if isinstance(obj, dict) and isinstance(obj.get("function"), dict):  # OpenAI tool_calls entry
        call_id, obj = obj.get("id"), obj["function"]
    else:
        call_id = obj.get("id") if isinstance(obj, dict) else None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        raise _err(origin, f"a tool call has no name: {str(obj)[:80]}",
                   'write calls as {"name": ..., "arguments": {...}}', "bad_arguments")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            arguments = parse_arguments(args, allow_python=False)
        except ReActError as e:
            raise _err(origin, f"tool call `{obj['name']}`: {e}", "arguments must be a JSON object",
                       e.kind) from None
    elif isinstance(args, dict):
        arguments = canonical_json(args)
    else:
        raise _err(origin, f"tool call `{obj['name']}`: arguments must be a JSON object, got {type(args).__name__}",
                   kind="bad_arguments")
    return ToolCall(name=obj["name"], arguments=arguments, id=call_id)


def _as_text(value, origin: str, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _err(origin, f"{what} must be a string, got {type(value).__name__}", kind="bad_record")
    return value


def _weight(turn: dict, origin: str) -> float | None:
    """Optional per-message loss weight override."""
    w = turn.get("weight")
    if w is None:
        return None
    if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
        raise _err(origin, f"`weight` must be a number >= 0, got {w!r}", kind="bad_record")
    return float(w)


def _require(record: dict, key: str, typ, origin: str, fmt: str):
    if key not in record:
        raise _err(origin, f"missing `{key}`", f"a {fmt} record needs a `{key}` field", "bad_record")
    if not isinstance(record[key], typ):
        raise _err(origin, f"`{key}` must be a {typ.__name__}", kind="bad_record")
    return record[key]


def _react_messages(text: str, origin: str, *, allow_trailing_call: bool = True) -> list[Message]:
    """An assistant ReAct trace (observations inline) -> assistant/tool messages that the
    ``react`` template renders back byte for byte via ``raw``."""
    steps, observations = split_observations(text)
    messages: list[Message] = []
    for i, step_text in enumerate(steps):
        try:
            step = parse_step(step_text)
        except ReActError as e:
            raise _err(origin, str(e), "write `Action: tool_name` then `Action Input: {...}`", e.kind) from None
        followed_by_observation = i < len(observations)
        if step.call is not None:
            messages.append(Message("assistant", "", [step.call], reasoning=step.thought, raw=step_text))
        elif followed_by_observation:
            raise _err(origin, "an `Observation:` follows a step with no `Action:`",
                       "every observation must answer an Action", "role_order")
        elif step_text.strip():
            content = step.final_answer if step.final_answer is not None else step_text.strip()
            reasoning = step.thought if step.final_answer is not None else None
            messages.append(Message("assistant", content, reasoning=reasoning, raw=step_text))
        if followed_by_observation:
            obs = observations[i]
            name = step.call.name if step.call else None
            messages.append(Message("tool", obs.strip(), raw=obs, name=name))
    if not allow_trailing_call and messages and messages[-1].tool_calls:
        raise _err(origin, "the trace ends with an Action that has no Observation", kind="role_order")
    return messages


def _ms_agent_tools(system: str, origin: str) -> list[dict]:
    """Parse the numbered API list of the ms-agent system prompt into tool schemas."""
    tools = []
    decoder = json.JSONDecoder()
    for m in _API_LINE.finditer(system):
        name, description = m.group(1), m.group(2).rstrip(".").strip()
        try:
            params, _ = decoder.raw_decode(system, m.end())
        except json.JSONDecodeError as e:
            raise _err(origin, f"API `{name}` in the system prompt has unreadable Parameters ({e.msg})",
                       "Parameters must be a JSON list", "bad_tools") from None
        properties, required = {}, []
        for p in params if isinstance(params, list) else []:
            if not isinstance(p, dict) or "name" not in p:
                continue
            prop = {k: v for k, v in p.items() if k in ("type", "description", "enum")}
            properties[p["name"]] = prop
            if str(p.get("required", "")).lower() == "true":
                required.append(p["name"])
        schema = {"type": "object", "properties": properties, "required": required}
        tools.append({"name": name, "description": description, "parameters": schema})
    return tools


# ---------------------------------------------------------------------------- readers


def read_ms_agent(record: dict, origin: str) -> Conversation:
    turns = _require(record, "conversations", list, origin, "ms-agent")
    messages: list[Message] = []
    tools: list[dict] = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise _err(origin, "each conversation turn must be an object", kind="bad_record")
        role, value = turn.get("from"), _as_text(turn.get("value"), origin, "`value`")
        start, weight = len(messages), _weight(turn, origin)
        if role == "system":
            messages.append(Message("system", value))
            if _API_LIST_MARK in value:
                tools = _ms_agent_tools(value, origin)
        elif role == "user":
            messages.append(Message("user", value))
        elif role == "assistant":
            if has_react_keywords(value):
                messages.extend(_react_messages(value, origin))
            else:
                messages.append(Message("assistant", value, raw=value))
        else:
            raise _err(origin, f"unknown role `{role}`", "ms-agent roles are system, user, assistant",
                       "unknown_role")
        for m in messages[start:]:
            m.weight = weight
    return Conversation(messages, tools, meta={"tools_declared": bool(tools)})


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "function_call": "function_call", "observation": "tool", "system": "system"}


def read_sharegpt(record: dict, origin: str) -> Conversation:
    turns = _require(record, "conversations", list, origin, "ShareGPT")
    messages: list[Message] = []
    system = record.get("system")
    if system:
        messages.append(Message("system", _as_text(system, origin, "`system`")))
    position = 0  # human/observation at even positions (0-based), gpt/function_call at odd
    more_results = 0  # a function_call with k parallel calls may be answered by k observation turns
    for turn in turns:
        if not isinstance(turn, dict):
            raise _err(origin, "each conversation turn must be an object", kind="bad_record")
        tag, value = turn.get("from"), _as_text(turn.get("value"), origin, "`value`")
        role = _SHAREGPT_ROLES.get(tag)
        if role is None:
            raise _err(origin, f"unknown role `{tag}`",
                       "ShareGPT roles are human, gpt, function_call, observation, system", "unknown_role")
        if role == "system":
            if messages:
                raise _err(origin, "a `system` turn must come first", kind="role_order")
            messages.append(Message("system", value))
            continue
        expect_user = position % 2 == 0
        if role == "tool" and not expect_user and more_results > 0 and messages[-1].role == "tool":
            more_results -= 1  # the next result of the same parallel call: one tool message each
            messages.append(Message("tool", value))
            messages[-1].weight = _weight(turn, origin)
            continue
        if role != "tool":
            more_results = 0
        if (role in ("user", "tool")) != expect_user:
            raise _err(origin, f"`{tag}` at turn {position + 1} breaks the alternation",
                       "human/observation must alternate with gpt/function_call", "role_order")
        position += 1
        if role == "function_call":
            reasoning, value = _split_think(value)  # reasoning before the calls, as a gpt turn may have
            try:
                obj = json.loads(value)
            except json.JSONDecodeError as e:
                raise _err(origin, f"function_call is not valid JSON ({e.msg}): {value[:80]!r}",
                           'write {"name": ..., "arguments": {...}}', "bad_arguments") from None
            calls = [_call_from_obj(o, origin) for o in (obj if isinstance(obj, list) else [obj])]
            messages.append(Message("assistant", "", calls, reasoning=reasoning))
            more_results = len(calls) - 1
        elif role == "assistant":
            reasoning, content = _split_think(value)
            messages.append(Message("assistant", content, reasoning=reasoning))
        else:
            messages.append(Message(role, value))
        messages[-1].weight = _weight(turn, origin)
    tools = _parse_tools(record.get("tools"), origin)
    return Conversation(messages, tools, meta={"tools_declared": "tools" in record})


def _openai_content(content, origin: str) -> tuple[str, str | None, list[ToolCall]]:
    """String or typed parts -> (text, reasoning, calls). Parts carry their text under
    ``text`` (OpenAI) or ``value`` (LLaMA-Factory)."""
    if content is None or isinstance(content, str):
        return content or "", None, []
    if not isinstance(content, list):
        raise _err(origin, f"`content` must be a string or a list of parts, got {type(content).__name__}",
                   kind="bad_record")
    texts, reasonings, calls = [], [], []
    for part in content:
        if not isinstance(part, dict):
            raise _err(origin, "a content part must be an object", kind="bad_record")
        kind = part.get("type", "text")
        value = part.get("text", part.get("value", ""))
        if kind == "text":
            texts.append(_as_text(value, origin, "a text part"))
        elif kind in ("reasoning", "thinking"):
            reasonings.append(_as_text(value, origin, "a reasoning part"))
        elif kind == "tool_call":
            try:
                obj = json.loads(value) if isinstance(value, str) else value
            except json.JSONDecodeError as e:
                raise _err(origin, f"a tool_call part is not valid JSON ({e.msg})", kind="bad_arguments") from None
            calls.append(_call_from_obj(obj, origin))
        else:
            raise _err(origin, f"unsupported content part type `{kind}`",
                       "supported: text, reasoning, tool_call", "bad_record")
    return "".join(texts), ("\n".join(reasonings) or None), calls


def read_openai(record: dict, origin: str) -> Conversation:
    raw_messages = _require(record, "messages", list, origin, "OpenAI")
    messages = []
    for m in raw_messages:
        if not isinstance(m, dict):
            raise _err(origin, "each message must be an object", kind="bad_record")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ROLES:
            raise _err(origin, f"unknown role `{m.get('role')}`", f"roles are {', '.join(ROLES)}", "unknown_role")
        text, reasoning, calls = _openai_content(m.get("content"), origin)
        reasoning = m.get("reasoning_content") or m.get("reasoning") or reasoning
        if role == "assistant" and reasoning is None:
            reasoning, text = _split_think(text)
        calls += [_call_from_obj(c, origin) for c in m.get("tool_calls") or []]
        messages.append(Message(role, text, calls, reasoning=reasoning, weight=_weight(m, origin),
                                tool_call_id=m.get("tool_call_id"), name=m.get("name")))
    tools = _parse_tools(record.get("tools"), origin)
    return Conversation(messages, tools, meta={"tools_declared": "tools" in record})


def read_alpaca(record: dict, origin: str) -> Conversation:
    instruction = _as_text(_require(record, "instruction", str, origin, "Alpaca"), origin, "`instruction`")
    output = _as_text(_require(record, "output", str, origin, "Alpaca"), origin, "`output`")
    query = instruction + ("\n" + record["input"] if record.get("input") else "")
    messages = []
    if record.get("system"):
        messages.append(Message("system", _as_text(record["system"], origin, "`system`")))
    for pair in record.get("history") or []:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise _err(origin, "`history` must be a list of [user, assistant] string pairs", kind="bad_record")
        messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    messages.append(Message("user", query))
    if has_react_trace(output):  # FireAct: the whole trace, observations included, sits in `output`
        messages += _react_messages(output, origin)
    else:
        messages.append(Message("assistant", output))
    return Conversation(messages)


def read_react_messages(record: dict, origin: str) -> Conversation:
    """FireAct: assistant turns hold ``Thought/Action: tool[arg]``; the environment answers
    in *user* turns that start with ``Observation:``. Those become tool messages."""
    raw_messages = _require(record, "messages", list, origin, "ReAct messages")
    messages: list[Message] = []
    for m in raw_messages:
        if not isinstance(m, dict):
            raise _err(origin, "each message must be an object", kind="bad_record")
        role, content = m.get("role"), _as_text(m.get("content"), origin, "`content`")
        if role == "user" and content.startswith("Observation:"):
            if not (messages and messages[-1].tool_calls):
                raise _err(origin, "an Observation turn follows no Action", "each Observation must answer an Action",
                           "role_order")
            obs = content[len("Observation:"):] + "\n"
            messages.append(Message("tool", obs.strip(), raw=obs, name=messages[-1].tool_calls[0].name))
        elif role == "assistant":
            try:
                step = parse_step(content)
            except ReActError as e:
                raise _err(origin, str(e), "write `Action: tool[argument]`", e.kind) from None
            calls = [step.call] if step.call else []
            text = step.final_answer if step.final_answer is not None else ("" if calls else content)
            messages.append(Message("assistant", text, calls, reasoning=step.thought, raw=content + "\n"))
        elif role in ("system", "user"):
            messages.append(Message(role, content))
        else:
            raise _err(origin, f"unknown role `{role}`", "roles are system, user, assistant", "unknown_role")
    return Conversation(messages)


READERS: dict[str, Callable[[dict, str], Conversation]] = {
    "ms_agent": read_ms_agent,
    "sharegpt": read_sharegpt,
    "openai": read_openai,
    "alpaca": read_alpaca,
    "react_messages": read_react_messages,
}


def detect_format(record) -> str | None:
    """Guess a record's format from its shape; None when nothing fits."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("conversations"), list):
        tags = {t.get("from") for t in record["conversations"] if isinstance(t, dict)}
        if tags & {"human", "gpt", "function_call", "observation"} or "tools" in record:
            return "sharegpt"
        return "ms_agent"
    if isinstance(record.get("messages"), list):
        msgs = [m for m in record["messages"] if isinstance(m, dict)]
        if "tools" in record or any(m.get("role") == "tool" or m.get("tool_calls") for m in msgs):
            return "openai"
        if any(m.get("role") == "user" and str(m.get("content", "")).startswith("Observation:") for m in msgs):
            return "react_messages"
        return "openai"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


# ---------------------------------------------------------------------------- validation


def validate(conv: Conversation) -> None:
    """Checks every format shares: role order, empty turns, declared tools."""
    origin, names = conv.origin, conv.tool_names()
    pending_call = False
    if not any(m.role == "assistant" for m in conv.messages):
        raise _err(origin, "the conversation has no assistant turn", "there is nothing to learn from",
                   "empty_assistant")
    for i, m in enumerate(conv.messages):
        if m.role == "system" and i != 0:
            raise _err(origin, f"a system message at position {i + 1}", "put the system message first", "role_order")
        if m.role == "tool" and not pending_call:
            raise _err(origin, f"a tool result at position {i + 1} answers no tool call",
                       "each observation must follow an assistant turn with a tool call", "role_order")
        if m.role == "assistant":
            if not (m.content.strip() or m.tool_calls or m.reasoning):
                raise _err(origin, f"assistant turn {i + 1} is empty", "remove it or give it content", "empty_assistant")
            for call in m.tool_calls:
                if conv.meta.get("tools_declared") and call.name not in names:
                    raise _err(origin, f"calls tool `{call.name}`, which is not in `tools`",
                               f"declared tools: {', '.join(sorted(names)) or 'none'}", "unknown_tool")
        pending_call = (m.role == "assistant" and bool(m.tool_calls)) or (m.role == "tool" and pending_call)


def fill_placeholders(conv: Conversation, placeholders: dict[str, str]) -> None:
    """Self-cognition data: ``{{name}}`` / ``{{author}}`` -> values from config."""
    for m in conv.messages:
        for key, value in placeholders.items():
            m.content = m.content.replace("{{" + key + "}}", value)


# ---------------------------------------------------------------------------- files


def _iter_json_array(text: str, path: str) -> Iterator[tuple[str, object]]:
    """Decode a top-level JSON list element by element so each record knows its line."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, 0).end()
    if text[pos : pos + 1] == "{":  # dict of id -> record (FireAct trajectories)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield f"{path}:{e.lineno}", DataError(f"{path}:{e.lineno}", f"invalid JSON ({e.msg})", kind="invalid_json")
            return
        for key, value in obj.items():
            yield f"{path}#{key}", value
        return
    if text[pos : pos + 1] != "[":
        yield f"{path}:1", DataError(f"{path}:1", "a .json file must hold a list of records",
                                     "use .jsonl for one record per line", "invalid_json")
        return
    pos = ws.match(text, pos + 1).end()
    line, counted = 1, 0
    while pos < len(text) and text[pos] != "]":
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield f"{path}:{e.lineno}", DataError(f"{path}:{e.lineno}", f"invalid JSON ({e.msg})",
                                                  "the rest of the file cannot be read", "invalid_json")
            return
        yield f"{path}:{line}", record
        pos = ws.match(text, end).end()
        if text[pos : pos + 1] == ",":
            pos = ws.match(text, pos + 1).end()
        elif text[pos : pos + 1] not in ("]", ""):
            at = text.count("\n", 0, pos) + 1
            yield f"{path}:{at}", DataError(f"{path}:{at}", f"expected `,` or `]` after a record, found `{text[pos]}`",
                                            "the rest of the file cannot be read", "invalid_json")
            return
    if pos >= len(text):  # a file cut short: every record so far decoded, but the list never closes
        at = text.count("\n") + 1
        yield f"{path}:{at}", DataError(f"{path}:{at}", "the file ends before the list's closing `]` (cut short?)",
                                        "check that the file was written completely", "invalid_json")
    elif (after := ws.match(text, pos + 1).end()) < len(text):
        at = text.count("\n", 0, after) + 1
        yield f"{path}:{at}", DataError(f"{path}:{at}", "text after the list's closing `]`",
                                        "a .json file holds one list of records", "invalid_json")


def iter_records(path: str | Path) -> Iterator[tuple[str, object]]:
    """Yield ``(origin, record)`` pairs; a record that cannot be decoded is a DataError."""
    path = str(path)
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{lineno}", DataError(f"{path}:{lineno}", f"invalid JSON ({e.msg} at column {e.colno})",
                                                        "each line must be one JSON object", "invalid_json")
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            yield from _iter_json_array(f.read(), path)
    else:
        raise DataError(path, "unsupported file type", "use .json (a list of records) or .jsonl", "unknown_format")


def group_value(record: dict, key: str, origin: str) -> str:
    """The value at dotted path ``key`` of a raw record, as a sampling-group name."""
    value = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise DataError(origin, f"the record has no field `{key}`, which the dataset's balance_by names",
                            f"add `{key}` to every record of the file, or remove it from balance_by", "bad_group")
        value = value[part]
    if isinstance(value, (dict, list)) or value is None:
        raise DataError(origin, f"`{key}` is {json.dumps(value)[:60]}, not a name for a sampling group",
                        "balance_by fields must hold strings, numbers or booleans", "bad_group")
    return str(value)


def read_file(path: str | Path, format: str = "auto", source: str = "agent",
              placeholders: dict[str, str] | None = None,
              balance_by: list[str] = ()) -> Iterator[Conversation | DataError]:
    """Stream a data file as conversations, or DataErrors for records that are wrong.

    The format is ``format`` if given, else detected from each record's shape. ``balance_by``:
    record fields whose values name the conversation's sampling group (``meta["group"]``).
    """
    if not Path(path).exists():
        raise DataError(str(path), "file not found", "check the dataset path", "missing_file")
    if format != "auto" and format not in READERS:
        raise DataError(str(path), f"unknown format `{format}`", f"choose one of {', '.join(READERS)}",
                        "unknown_format")
    for origin, record in iter_records(path):
        if isinstance(record, DataError):
            yield record
            continue
        # Auto-detection is per record: cheap, and mixed files then just work.
        detected = format if format != "auto" else detect_format(record)
        if detected is None:
            yield DataError(origin, "cannot tell the record's format",
                            f"set format= to one of {', '.join(READERS)}", "unknown_format")
            continue
        reader = READERS[detected]
        try:
            if not isinstance(record, dict):
                raise DataError(origin, "a record must be a JSON object", kind="bad_record")
            conv = reader(record, origin)
            conv.origin, conv.source = origin, source
            conv.meta["group"] = "/".join([source, *(group_value(record, key, origin) for key in balance_by)])
            fill_placeholders(conv, placeholders or {})
            validate(conv)
        except DataError as e:
            yield e
            continue
        yield conv
