"""Chat templates: how a :class:`Conversation` becomes text, one labelled segment at a time.

A template renders a conversation into :class:`Segment` s. Their texts concatenate to
exactly what the model sees at inference, and each segment says which message it comes
from and what kind of text it is, so ``encode.py`` can decide per segment what is trained.

Segment kinds:

- ``header``: role headers and template scaffolding (default system prompt, tool listings,
  ``<tool_response>`` wrappers, the newline after an end-of-turn token). Never trained.
- ``system`` / ``prompt``: text of system and user messages.
- ``content`` / ``reasoning`` / ``tool_call``: assistant text, its reasoning and its calls.
- ``thought`` / ``action`` / ``action_input`` / ``final_answer``: the ReAct lines of an
  assistant step (``react`` template).
- ``obs_marker``: the ``Observation:`` keyword the model writes before it stops (``react``).
- ``observation``: a tool result. Environment output, not model output.
- ``eot``: the end-of-turn token of a message's turn.

Every template also carries a Jinja ``chat_template`` that renders byte-identical text
from :func:`to_hf_messages`, so the tokenizer saved with a tuned model formats prompts at
serving time exactly as they were formatted in training (tests check the parity).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from agenttune.data.schema import Conversation, DataError, Message, ToolCall

HEADER = "header"


@dataclass(frozen=True)
class Segment:
    text: str
    role: str
    """Role of the turn the text sits in (a header of a user turn has role ``user``)."""
    kind: str
    msg_index: int | None
    """Index into ``conv.messages``; None only for scaffolding that belongs to no message."""


class _Segments:
    """Collects segments, skipping empty text so segment boundaries are real boundaries."""

    def __init__(self) -> None:
        self.items: list[Segment] = []

    def add(self, text: str, role: str, kind: str, msg_index: int | None = None) -> None:
        if text:
            self.items.append(Segment(text, role, kind, msg_index))


@dataclass(frozen=True)
class Template:
    name: str
    chat_template: str
    """Jinja for ``tokenizer.chat_template``; renders the same text as :meth:`render`."""
    stop_words: tuple[str, ...]
    """Strings that end a generation step (ReAct stops at ``Observation:`` to run the tool)."""
    eos_token: str
    """The token that ends an assistant turn."""
    _render: Callable[[Conversation, bool], list[Segment]]

    def render(self, conv: Conversation, add_generation_prompt: bool = False) -> list[Segment]:
        _check_conversation(conv)
        return self._render(conv, add_generation_prompt)

    def render_text(self, conv: Conversation, add_generation_prompt: bool = False) -> str:
        return "".join(s.text for s in self.render(conv, add_generation_prompt))


# ----------------------------------------------------------------------------- shared helpers


def _check_conversation(conv: Conversation) -> None:
    if not conv.messages:
        raise DataError(conv.origin, "conversation has no messages")
    for i, m in enumerate(conv.messages):
        if m.role not in ("system", "user", "assistant", "tool"):
            raise DataError(conv.origin, f"message {i} has unknown role {m.role!r}",
                            hint="roles are system, user, assistant, tool")


def _tojson(value) -> str:
    """JSON exactly as the ``tojson`` filter of transformers' chat-template sandbox writes it."""
    return json.dumps(value, ensure_ascii=False)


def _call_args(call: ToolCall, origin: str):
    try:
        return json.loads(call.arguments)
    except (json.JSONDecodeError, TypeError) as err:
        raise DataError(origin, f"arguments of tool call {call.name!r} are not valid JSON ({err})",
                        hint="ToolCall.arguments must hold json.dumps(...) of the arguments") from None


def _hf_tools(conv: Conversation) -> list[dict]:
    return [{"type": "function", "function": tool} for tool in conv.tools]


def _think(reasoning: str) -> str:
    # Qwen3's convention; Qwen2.5 itself has no reasoning slot. Text is kept as written (no stripping).
    return f"<think>\n{reasoning}\n</think>\n\n"


def to_hf_messages(conv: Conversation) -> tuple[list[dict], list[dict] | None]:
    """OpenAI-style ``(messages, tools)`` for ``tokenizer.apply_chat_template``.

    Reasoning goes under ``reasoning_content``. ``raw`` (message) and ``raw`` (tool call) are
    passed through when set so the ``react`` chat template can reproduce ms-agent text; other
    templates ignore them. ``tool_calls`` is present only when there are calls, because Llama
    3.1's template tests ``'tool_calls' in message``. ``tools`` is None when there are none,
    because Llama 3.1's template tests ``tools is not none``.
    """
    messages = []
    for m in conv.messages:
        msg: dict = {"role": m.role, "content": m.content}
        if m.reasoning:
            msg["reasoning_content"] = m.reasoning
        if m.tool_calls:
            msg["tool_calls"] = [_hf_call(c, conv.origin) for c in m.tool_calls]
        if m.raw is not None:
            msg["raw"] = m.raw
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            msg["name"] = m.name
        messages.append(msg)
    return messages, (_hf_tools(conv) or None)


def _hf_call(call: ToolCall, origin: str) -> dict:
    out: dict = {"type": "function", "function": {"name": call.name, "arguments": _call_args(call, origin)}}
    if call.id is not None:
        out["id"] = call.id
    if call.raw is not None:
        out["raw"] = call.raw
    return out


# ----------------------------------------------------------------------------- qwen (Qwen2.5 + Hermes)

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_QWEN_TOOLS_INTRO = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_QWEN_TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\n</tool_call>'
)


def _hermes_call(call: ToolCall, origin: str) -> str:
    return f'<tool_call>\n{{"name": "{call.name}", "arguments": {_tojson(_call_args(call, origin))}}}\n</tool_call>'


def _chatml_assistant(out: _Segments, conv: Conversation, i: int, call_text=None) -> None:
    """``<|im_start|>assistant\\n`` [reasoning] content [\\n<tool_call>...]* ``<|im_end|>\\n``.

    Byte-identical to Qwen2.5's two assistant branches when there is no reasoning: with calls
    it writes ``<|im_start|>assistant`` + ``\\n`` + content, and each call opens with ``\\n``,
    except that the header's newline already stands in front of the first call when there is
    no content. That is Qwen3's rule too, which also covers reasoning.
    """
    m = conv.messages[i]
    out.add("<|im_start|>assistant\n", "assistant", HEADER, i)
    if m.reasoning:
        out.add(_think(m.reasoning), "assistant", "reasoning", i)
    out.add(m.content, "assistant", "content", i)
    for k, call in enumerate(m.tool_calls):
        sep = "\n" if (k > 0 or m.content) else ""
        out.add(sep + (call_text or _hermes_call)(call, conv.origin), "assistant", "tool_call", i)
    out.add("<|im_end|>", "assistant", "eot", i)
    out.add("\n", "assistant", HEADER, i)


def _chatml_turn(out: _Segments, m: Message, i: int) -> None:
    kind = "prompt" if m.role == "user" else "system"
    out.add(f"<|im_start|>{m.role}\n", m.role, HEADER, i)
    out.add(m.content, m.role, kind, i)
    out.add("<|im_end|>", m.role, "eot", i)
    out.add("\n", m.role, HEADER, i)


def _render_qwen(conv: Conversation, add_generation_prompt: bool) -> list[Segment]:
    out = _Segments()
    msgs = conv.messages
    has_system = msgs[0].role == "system"
    sys_index = 0 if has_system else None
    out.add("<|im_start|>system\n", "system", HEADER, sys_index)
    if has_system:
        out.add(msgs[0].content, "system", "system", 0)
    else:
        out.add(QWEN_DEFAULT_SYSTEM, "system", HEADER)
    if conv.tools:
        listing = "".join("\n" + _tojson(t) for t in _hf_tools(conv))
        out.add(_QWEN_TOOLS_INTRO + listing + _QWEN_TOOLS_OUTRO, "system", HEADER, sys_index)
    out.add("<|im_end|>", "system", "eot" if has_system else HEADER, sys_index)
    out.add("\n", "system", HEADER, sys_index)

    for i in range(1 if has_system else 0, len(msgs)):
        m = msgs[i]
        if m.role == "assistant":
            _chatml_assistant(out, conv, i)
        elif m.role == "tool":
            # Consecutive tool results share one user turn, each in its own <tool_response>.
            if i == 0 or msgs[i - 1].role != "tool":
                out.add("<|im_start|>user", "tool", HEADER, i)
            out.add("\n<tool_response>\n", "tool", HEADER, i)
            out.add(m.content, "tool", "observation", i)
            out.add("\n</tool_response>", "tool", HEADER, i)
            if i == len(msgs) - 1 or msgs[i + 1].role != "tool":
                out.add("<|im_end|>\n", "tool", HEADER, i)
        else:
            _chatml_turn(out, m, i)
    if add_generation_prompt:
        out.add("<|im_start|>assistant\n", "assistant", HEADER)
    return out.items


# The assistant turn up to each call (optional <think> reasoning, the content, the newline between
# calls), and its end: shared by the Hermes templates and chatml_kv. Spliced into each template
# string, so every saved chat_template still stands alone.
_ASSISTANT_OPEN_JINJA = r"""        {{- '<|im_start|>assistant\n' }}
        {%- if message.reasoning_content %}
            {{- '<think>\n' + message.reasoning_content + '\n</think>\n\n' }}
        {%- endif %}
        {{- message.content }}
        {%- for tool_call in message.tool_calls | default([]) %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {%- if message.content or not loop.first %}
                {{- '\n' }}
            {%- endif %}
"""
_ASSISTANT_CLOSE_JINJA = r"""        {%- endfor %}
        {{- '<|im_end|>\n' }}
"""
# Hermes (qwen, chatml, chatml_compact): each call as <tool_call>{"name", "arguments"}</tool_call>.
_HERMES_ASSISTANT_JINJA = _ASSISTANT_OPEN_JINJA + r"""            {{- '<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\n</tool_call>' }}
""" + _ASSISTANT_CLOSE_JINJA


# The official Qwen2.5-Instruct template with one addition: an assistant message's
# ``reasoning_content`` renders as <think>...</think> (Qwen3's convention). Without reasoning
# the output is byte-identical to the official template (tests/fixtures/chat_templates).
QWEN_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
""" + _HERMES_ASSISTANT_JINJA + r"""    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


# ----------------------------------------------------------------------------- llama3 (Llama 3.1)

_LLAMA_DATE = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
_LLAMA_TOOLS_INTRO = (
    "Given the following functions, please respond with a JSON for a function call "
    "with its proper arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)


def _llama_header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def _render_llama3(conv: Conversation, add_generation_prompt: bool) -> list[Segment]:
    """Llama 3.1's official format, custom tools in the first user message.

    Like the official template (and so like vLLM at serving time) it has no slot for
    reasoning or for text next to a tool call: both are left out of the rendering. System,
    user and assistant text is stripped (``| trim``); tool results are JSON-encoded
    (``| tojson``, because a Jinja string is iterable).
    """
    out = _Segments()
    msgs = conv.messages
    has_system = msgs[0].role == "system"
    sys_index = 0 if has_system else None
    rest = range(1 if has_system else 0, len(msgs))

    out.add("<|begin_of_text|>", "system", HEADER)
    out.add(_llama_header("system"), "system", HEADER, sys_index)
    out.add(("Environment: ipython\n" if conv.tools else "") + _LLAMA_DATE, "system", HEADER, sys_index)
    if has_system:
        out.add(msgs[0].content.strip(), "system", "system", 0)
    out.add("<|eot_id|>", "system", "eot" if has_system else HEADER, sys_index)

    if conv.tools:
        if not rest or msgs[rest[0]].role != "user":
            raise DataError(conv.origin, "the llama3 template puts tools into the first user message, "
                            "but the conversation does not start with one (after the system message)")
        i = rest[0]
        listing = "".join(json.dumps(t, ensure_ascii=False, indent=4) + "\n\n" for t in _hf_tools(conv))
        out.add(_llama_header("user"), "user", HEADER, i)
        out.add(_LLAMA_TOOLS_INTRO + listing, "user", HEADER, i)
        out.add(msgs[i].content.strip(), "user", "prompt", i)
        out.add("<|eot_id|>", "user", "eot", i)
        rest = rest[1:]

    for i in rest:
        m = msgs[i]
        if m.role == "tool":
            out.add(_llama_header("ipython"), "tool", HEADER, i)
            out.add(_tojson(m.content), "tool", "observation", i)
            out.add("<|eot_id|>", "tool", HEADER, i)
        elif m.tool_calls:
            if len(m.tool_calls) != 1:
                raise DataError(conv.origin, f"message {i} makes {len(m.tool_calls)} parallel tool calls; "
                                "Llama 3.1's format allows one call per message",
                                hint="use template=qwen or chatml, or split the calls into separate turns")
            call = m.tool_calls[0]
            text = f'{{"name": "{call.name}", "parameters": {_tojson(_call_args(call, conv.origin))}}}'
            out.add(_llama_header("assistant"), "assistant", HEADER, i)
            out.add(text, "assistant", "tool_call", i)
            out.add("<|eot_id|>", "assistant", "eot", i)
        else:
            kind = {"assistant": "content", "user": "prompt", "system": "system"}[m.role]
            out.add(_llama_header(m.role), m.role, HEADER, i)
            out.add(m.content.strip(), m.role, kind, i)
            out.add("<|eot_id|>", m.role, "eot", i)
    if add_generation_prompt:
        out.add(_llama_header("assistant"), "assistant", HEADER)
    return out.items


# Llama 3.1's official template with the options we never use removed (builtin tools,
# custom_tools, tools in the system message, date_string) and bos_token written out, so it
# renders the same with any tokenizer. For our inputs it is byte-identical to the official one.
LLAMA3_CHAT_TEMPLATE = r"""{{- '<|begin_of_text|>' }}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: 26 Jul 2024\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools is not none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""


# ----------------------------------------------------------------------------- react (ms-agent)

REACT_API_MARKER = "You have access to the following APIs:"
_REACT_FORMAT = (
    "\n\nUse the following format:\n\n"
    "Thought: you should always think about what to do\n"
    "Action: the action to take, should be one of the above tools[{names}]\n"
    "Action Input: the input to the action\n"
    "Observation: the result of the action\n"
    "... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n"
    "Thought: I now know the final answer\n"
    "Final Answer: the final answer to the original input question\n"
    "Begin!"
)
_REACT_KINDS = {"Thought:": "thought", "Action:": "action", "Action Input:": "action_input",
                "Final Answer:": "final_answer"}
_REACT_LINE = re.compile(r"^(Thought:|Action Input:|Action:|Final Answer:|Observation:)", re.MULTILINE)


def react_system_prompt(system: str, tools: list[dict]) -> str:
    """ms-agent's system prompt built from tool schemas, with the user's system text first.

    An API's human-readable name drops underscores, as in ms-agent's own data
    (``weather_lookup`` -> "the weatherlookup API").
    """
    entries = []
    for n, tool in enumerate(tools, start=1):
        props = (tool.get("parameters") or {}).get("properties") or {}
        required = (tool.get("parameters") or {}).get("required") or []
        params = [{"name": p, "description": spec.get("description", ""),
                   "required": "True" if p in required else "False"} for p, spec in props.items()]
        human = tool["name"].replace("_", "")
        entries.append(f"{n}. {tool['name']}: Call this tool to interact with the {human} API. "
                       f"What is the {human} API useful for? {tool.get('description') or ''}. "
                       f"Parameters: {_tojson(params)}")
    names = ", ".join(t["name"] for t in tools)
    prompt = ("Answer the following questions as best you can. " + REACT_API_MARKER + "\n"
              + "\n\n".join(entries) + _REACT_FORMAT.format(names=names))
    return f"{system}\n\n{prompt}" if system else prompt


def split_react(text: str) -> list[tuple[str, str]]:
    """Cut ReAct text into ``(text, kind)`` pieces at keyword lines.

    A line starting with ``Thought:``, ``Action:``, ``Action Input:`` or ``Final Answer:``
    opens a section that runs to the next keyword line (so a multi-line Action Input stays
    one piece). Text before the first keyword is ``content``. An ``Observation:`` line inside
    assistant text is tool output pasted in: the keyword is ``obs_marker`` and the rest of
    its section ``observation``, so it is never trained by accident.
    """
    pieces: list[tuple[str, str]] = []
    pos, kind = 0, "content"
    for match in _REACT_LINE.finditer(text):
        if match.start() > pos:
            pieces.append((text[pos : match.start()], kind))
        keyword = match.group(1)
        if keyword == "Observation:":
            pieces.append((keyword, "obs_marker"))
            pos, kind = match.end(), "observation"
        else:
            pos, kind = match.start(), _REACT_KINDS[keyword]
    if pos < len(text):
        pieces.append((text[pos:], kind))
    return pieces


def _react_step(m: Message, agent: bool, origin: str) -> str:
    """An assistant message as ReAct text: ``raw`` verbatim, else synthesized."""
    if m.raw is not None:
        return m.raw
    if m.tool_calls:
        # In ReAct the words before an action are its thought.
        thought = m.reasoning or m.content
        text = f"Thought: {thought}\n" if thought else ""
        for call in m.tool_calls:
            if call.raw is not None:
                text += call.raw
            else:
                text += f"Action: {call.name}\nAction Input: {_tojson(_call_args(call, origin))}\n"
        return text
    if agent:
        return f"Thought: {m.reasoning or 'I now know the final answer'}\nFinal Answer: {m.content}"
    return m.content  # plain chat (ms-bench): no ReAct scaffolding, no reasoning slot


def _render_react(conv: Conversation, add_generation_prompt: bool) -> list[Segment]:
    """ms-agent ReAct inside ChatML.

    One assistant turn spans a run of assistant/tool messages: each tool message renders
    ``Observation:`` (written by the model, part of its turn) and then the result. A turn that
    ends on a tool result is closed with an untrained ``<|im_end|>``, except at the end of a
    generation prompt, where it stays open so the model continues after the observation.

    Readers keep ms-agent records byte-exact by cutting each assistant value at every
    ``Observation:``: an assistant message's ``raw`` is the text up to (not including) the
    keyword, the following tool message's ``raw`` is the text after it up to the next
    ``Thought:``/``Action:``/``Final Answer:`` line (usually ``" {...}\\n"``). The pieces
    concatenated with the keyword between them are the original value.
    """
    out = _Segments()
    msgs = conv.messages
    has_system = msgs[0].role == "system"
    system = msgs[0].content if has_system else ""
    agent = bool(conv.tools) or REACT_API_MARKER in system
    sys_index = 0 if has_system else None
    if conv.tools and REACT_API_MARKER not in system:
        out.add("<|im_start|>system\n", "system", HEADER, sys_index)
        out.add(system, "system", "system", sys_index)
        prompt = react_system_prompt(system, conv.tools)
        out.add(prompt[len(system) :], "system", HEADER, sys_index)
        out.add("<|im_end|>", "system", "eot" if has_system else HEADER, sys_index)
        out.add("\n", "system", HEADER, sys_index)
    elif system:
        _chatml_turn(out, msgs[0], 0)

    i = 1 if has_system else 0
    while i < len(msgs):
        if msgs[i].role in ("user", "system"):
            _chatml_turn(out, msgs[i], i)
            i += 1
            continue
        end = i
        while end < len(msgs) and msgs[end].role in ("assistant", "tool"):
            end += 1
        _react_turn(out, conv, i, end, agent, open_end=add_generation_prompt and end == len(msgs))
        i = end
    if add_generation_prompt and msgs[-1].role != "tool":
        out.add("<|im_start|>assistant\n", "assistant", HEADER)
    return out.items


def _react_turn(out: _Segments, conv: Conversation, start: int, end: int, agent: bool, open_end: bool) -> None:
    msgs = conv.messages
    out.add("<|im_start|>assistant\n", "assistant", HEADER, start)
    speaker = start  # the assistant message whose step an Observation: marker ends
    for k in range(start, end):
        m = msgs[k]
        if m.role == "assistant":
            speaker = k
            for text, kind in split_react(_react_step(m, agent, conv.origin)):
                out.add(text, "assistant", kind, k)
        else:
            out.add("Observation:", "assistant", "obs_marker", speaker)
            out.add(m.raw if m.raw is not None else f" {m.content}\n", "tool", "observation", k)
    last = end - 1
    if msgs[last].role == "assistant":
        out.add("<|im_end|>", "assistant", "eot", last)
        out.add("\n", "assistant", HEADER, last)
    elif not open_end:
        out.add("<|im_end|>\n", "assistant", HEADER, last)


REACT_CHAT_TEMPLATE = r"""{%- set api_marker = 'You have access to the following APIs:' %}
{%- set has_system = messages and messages[0].role == 'system' %}
{%- set system = messages[0].content if has_system else '' %}
{%- set agent = tools or api_marker in system %}
{%- if tools and api_marker not in system %}
    {{- '<|im_start|>system\n' }}
    {%- if system %}
        {{- system + '\n\n' }}
    {%- endif %}
    {{- 'Answer the following questions as best you can. You have access to the following APIs:\n' }}
    {%- for tool in tools %}
        {%- set fn = tool.function %}
        {%- set human = fn.name | replace('_', '') %}
        {%- if not loop.first %}
            {{- '\n\n' }}
        {%- endif %}
        {{- loop.index | string + '. ' + fn.name + ': Call this tool to interact with the ' + human + ' API. ' }}
        {{- 'What is the ' + human + ' API useful for? ' + (fn.description or '') + '. Parameters: [' }}
        {%- set params = fn.parameters or {} %}
        {%- set required = params.required or [] %}
        {%- for pname, spec in (params.properties or {}) | items %}
            {%- if not loop.first %}
                {{- ', ' }}
            {%- endif %}
            {{- '{"name": ' + pname | tojson + ', "description": ' + spec.description | default('') | tojson }}
            {{- ', "required": "' + ('True' if pname in required else 'False') + '"}' }}
        {%- endfor %}
        {{- ']' }}
    {%- endfor %}
    {{- '\n\nUse the following format:\n\nThought: you should always think about what to do\n' }}
    {{- 'Action: the action to take, should be one of the above tools[' + tools | map(attribute='function.name') | join(', ') + ']\n' }}
    {{- 'Action Input: the input to the action\nObservation: the result of the action\n' }}
    {{- '... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n' }}
    {{- 'Thought: I now know the final answer\nFinal Answer: the final answer to the original input question\nBegin!<|im_end|>\n' }}
{%- elif system %}
    {{- '<|im_start|>system\n' + system + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role in ['user', 'system'] %}
        {%- if not (loop.first and message.role == 'system') %}
            {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {%- if loop.first or messages[loop.index0 - 1].role not in ['assistant', 'tool'] %}
            {{- '<|im_start|>assistant\n' }}
        {%- endif %}
        {%- if message.role == 'tool' %}
            {{- 'Observation:' }}
            {%- if message.raw is defined and message.raw is not none %}
                {{- message.raw }}
            {%- else %}
                {{- ' ' + message.content + '\n' }}
            {%- endif %}
        {%- elif message.raw is defined and message.raw is not none %}
            {{- message.raw }}
        {%- elif message.tool_calls %}
            {%- set thought = message.reasoning_content or message.content %}
            {%- if thought %}
                {{- 'Thought: ' + thought + '\n' }}
            {%- endif %}
            {%- for tool_call in message.tool_calls %}
                {%- if tool_call.raw is defined and tool_call.raw is not none %}
                    {{- tool_call.raw }}
                {%- else %}
                    {{- 'Action: ' + tool_call.function.name + '\nAction Input: ' }}
                    {%- if tool_call.function.arguments is string %}
                        {{- tool_call.function.arguments }}
                    {%- else %}
                        {{- tool_call.function.arguments | tojson }}
                    {%- endif %}
                    {{- '\n' }}
                {%- endif %}
            {%- endfor %}
        {%- elif agent %}
            {{- 'Thought: ' + (message.reasoning_content or 'I now know the final answer') + '\nFinal Answer: ' + message.content }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {%- if loop.last or messages[loop.index0 + 1].role not in ['assistant', 'tool'] %}
            {%- if message.role == 'assistant' or not (loop.last and add_generation_prompt) %}
                {{- '<|im_end|>\n' }}
            {%- endif %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt and not (messages and messages[-1].role == 'tool') %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


# ----------------------------------------------------------------------------- chatml (plain)

_CHATML_TOOLS_INTRO = (
    "# Tools\n\nYou can call the functions below. To call one, reply with a JSON object inside "
    '<tool_call></tool_call> tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>\n\nFunctions"
)


def _json_listing(tools: list[dict]) -> str:
    return " (JSON schemas):" + "".join("\n" + _tojson(t) for t in tools)


def _ts_type(schema) -> str:
    """A JSON schema as a TypeScript-like type: ``"a" | "b"`` for an enum, ``string[]``,
    ``{key: type, optional?: type}``, ``any`` where the schema names no type."""
    if not isinstance(schema, dict):
        return "any"
    if "enum" in schema:
        return " | ".join(_tojson(v) for v in schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(str(k) for k in kind)
    if kind == "array":
        inner = _ts_type(schema["items"]) if "items" in schema else "any"
        return ("(" + inner + ")" if " | " in inner else inner) + "[]"
    if kind == "object" and isinstance(schema.get("properties"), dict):
        return "{" + _ts_fields(schema) + "}"
    return "any" if kind is None else str(kind)


def _ts_fields(schema: dict) -> str:
    required = schema.get("required") or []
    return ", ".join(f"{key}{'' if key in required else '?'}: {_ts_type(value)}"
                     for key, value in schema["properties"].items())


def _compact_listing(tools: list[dict]) -> str:
    """Each tool as ``// description``, ``// param: description (format)`` for the parameters
    that have either, then ``name(param: type, optional?: type)``. It keeps names, types,
    required, enums, descriptions and formats, in under half the tokens of the JSON schemas
    (the demo's tools: 326 tokens instead of 743); other keywords (pattern, minimum, default,
    additionalProperties) are not shown."""
    lines = [":"]
    for tool in tools:
        fn = tool["function"]
        if fn.get("description"):
            lines.append(f"// {fn['description']}")
        params = fn.get("parameters")
        properties = params.get("properties") if isinstance(params, dict) else None
        properties = properties if isinstance(properties, dict) else {}  # a malformed schema lists no parameters
        for key, value in properties.items():
            if isinstance(value, dict) and (value.get("description") or value.get("format")):
                note = value.get("description") or ""
                if value.get("format"):
                    note += (" " if note else "") + f"({value['format']})"
                lines.append(f"// {key}: {note}")
        lines.append(f"{fn['name']}({_ts_fields(params) if properties else ''})")
    return "\n".join(lines)


def _render_chatml(conv: Conversation, add_generation_prompt: bool, listing=_json_listing,
                   intro=_CHATML_TOOLS_INTRO, call_text=None) -> list[Segment]:
    """Plain ChatML. Tools are listed in the system turn (``listing``: JSON schemas, or compact
    signatures for chatml_compact and chatml_kv), calls are ``<tool_call>`` blocks (Hermes JSON,
    or ``call_text``'s lines for chatml_kv), and each tool result is its own ``tool`` turn."""
    out = _Segments()
    msgs = conv.messages
    has_system = msgs[0].role == "system"
    sys_index = 0 if has_system else None
    if has_system or conv.tools:
        system = msgs[0].content if has_system else ""
        out.add("<|im_start|>system\n", "system", HEADER, sys_index)
        out.add(system, "system", "system", sys_index)
        if conv.tools:
            out.add(("\n\n" if system else "") + intro + listing(_hf_tools(conv)), "system", HEADER,
                    sys_index)
        out.add("<|im_end|>", "system", "eot" if has_system else HEADER, sys_index)
        out.add("\n", "system", HEADER, sys_index)

    for i in range(1 if has_system else 0, len(msgs)):
        m = msgs[i]
        if m.role == "assistant":
            _chatml_assistant(out, conv, i, call_text)
        elif m.role == "tool":
            out.add("<|im_start|>tool\n", "tool", HEADER, i)
            out.add(m.content, "tool", "observation", i)
            out.add("<|im_end|>\n", "tool", HEADER, i)
        else:
            _chatml_turn(out, m, i)
    if add_generation_prompt:
        out.add("<|im_start|>assistant\n", "assistant", HEADER)
    return out.items


_CHATML_HEAD_JINJA = r"""{%- set has_system = messages and messages[0].role == 'system' %}
{%- if has_system or tools %}
    {{- '<|im_start|>system\n' }}
    {%- if has_system %}
        {{- messages[0].content }}
    {%- endif %}
    {%- if tools %}
        {%- if has_system and messages[0].content %}
            {{- '\n\n' }}
        {%- endif %}
        {{- '# Tools\n\nYou can call the functions below. To call one, reply with a JSON object inside <tool_call></tool_call> tags:\n' }}
        {{- '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n\nFunctions' }}
"""

_JSON_LISTING_JINJA = r"""        {{- ' (JSON schemas):' }}
        {%- for tool in tools %}
            {{- '\n' }}
            {{- tool | tojson }}
        {%- endfor %}
"""

# _compact_listing in Jinja. ts_type and ts_fields call each other for nested objects and arrays.
_COMPACT_LISTING_JINJA = r"""        {%- macro ts_fields(schema) -%}
            {%- for key, value in schema.properties.items() -%}
                {{- (', ' if not loop.first else '') ~ key ~ ('' if key in (schema.required or []) else '?') ~ ': ' ~ ts_type(value) -}}
            {%- endfor -%}
        {%- endmacro -%}
        {%- macro ts_type(schema) -%}
            {%- if schema is not mapping -%}
                {{- 'any' -}}
            {%- elif schema.enum is defined -%}
                {%- for v in schema.enum -%}{{- (' | ' if not loop.first else '') ~ (v | tojson) -}}{%- endfor -%}
            {%- elif schema.type is defined and schema.type is not string and schema.type is iterable -%}
                {{- schema.type | join(' | ') -}}
            {%- elif schema.type == 'array' -%}
                {%- set inner = ts_type(schema['items']) if schema['items'] is defined else 'any' -%}
                {{- ('(' ~ inner ~ ')' if ' | ' in inner else inner) ~ '[]' -}}
            {%- elif schema.type == 'object' and schema.properties is mapping -%}
                {{- '{' ~ ts_fields(schema) ~ '}' -}}
            {%- elif schema.type is defined and schema.type is not none -%}
                {{- schema.type -}}
            {%- else -%}
                {{- 'any' -}}
            {%- endif -%}
        {%- endmacro -%}
        {{- ':' }}
        {%- for tool in tools %}
            {%- set fn = tool.function %}
            {%- if fn.description %}
                {{- '\n// ' ~ fn.description }}
            {%- endif %}
            {%- set params = fn.parameters %}
            {%- set properties = params.properties if params is mapping and params.properties is mapping else {} %}
            {%- for key, value in properties.items() %}
                {%- if value is mapping and (value.description or value.format) %}
                    {%- set note = value.description or '' %}
                    {%- if value.format %}
                        {%- set note = note ~ (' ' if note else '') ~ '(' ~ value.format ~ ')' %}
                    {%- endif %}
                    {{- '\n// ' ~ key ~ ': ' ~ note }}
                {%- endif %}
            {%- endfor %}
            {{- '\n' ~ fn.name ~ '(' ~ (ts_fields(params) if properties else '') ~ ')' }}
        {%- endfor %}
"""

_CHATML_TAIL_JINJA = r"""    {%- endif %}
    {{- '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if loop.first and message.role == 'system' %}
    {%- elif message.role == 'assistant' %}
""" + _HERMES_ASSISTANT_JINJA + r"""    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
CHATML_CHAT_TEMPLATE = _CHATML_HEAD_JINJA + _JSON_LISTING_JINJA + _CHATML_TAIL_JINJA
CHATML_COMPACT_CHAT_TEMPLATE = _CHATML_HEAD_JINJA + _COMPACT_LISTING_JINJA + _CHATML_TAIL_JINJA


def _render_chatml_compact(conv: Conversation, add_generation_prompt: bool) -> list[Segment]:
    return _render_chatml(conv, add_generation_prompt, listing=_compact_listing)


# ----------------------------------------------------------------------------- chatml_kv

# chatml_compact with calls written as lines: the function's name, then ``key: value`` per argument.
# A string value is written as it is, so a name the user wrote (`` Busan`` after a space) is the same
# tokens in the call, where JSON would split it after a quote (``"``·``Bus``·``an``). A small model
# then copies rather than spells. Other values, and strings that would read as something else (a
# number, ``true``, JSON, leading or trailing blanks, a newline), are written as JSON.
_KV_TOOLS_INTRO = (
    "# Tools\n\nYou can call the functions below. To call one, reply inside <tool_call></tool_call> tags "
    "with the function's name, then one line per argument, its text as written (other values as JSON):\n"
    "<tool_call>\n<function-name>\n<argument>: <value>\n</tool_call>\n\nFunctions"
)
_KV_JSON_START = '"[{ \t\r'
_KV_BLANK_END = " \t\r"


def _floats(text: str) -> bool:
    try:
        float(text)  # what Jinja's float filter tries
        return True
    except ValueError:
        return False


def _kv_value(value) -> str:
    if (isinstance(value, str) and value and value[0] not in _KV_JSON_START and value[-1] not in _KV_BLANK_END
            and "\n" not in value and value not in ("true", "false", "null")
            and not (value[0] in "-0123456789" and _floats(value))):
        return value
    return _tojson(value)


def _kv_key_ok(key: str) -> bool:
    return bool(key) and ":" not in key and "\n" not in key and key == key.strip()


def _kv_call(call: ToolCall, origin: str) -> str:
    """``<tool_call>\nname\nkey: value...\n</tool_call>``; the Hermes JSON form where the arguments
    are not an object or a key holds a colon, a newline or outer blanks (the parser reads both)."""
    args = _call_args(call, origin)
    if not isinstance(args, dict) or not all(_kv_key_ok(k) for k in args):
        return _hermes_call(call, origin)
    lines = "".join(f"\n{key}: {_kv_value(value)}" for key, value in args.items())
    return f"<tool_call>\n{call.name}{lines}\n</tool_call>"


def _render_chatml_kv(conv: Conversation, add_generation_prompt: bool) -> list[Segment]:
    return _render_chatml(conv, add_generation_prompt, listing=_compact_listing, intro=_KV_TOOLS_INTRO,
                          call_text=_kv_call)


_KV_ASSISTANT_JINJA = _ASSISTANT_OPEN_JINJA + r"""            {%- set args = tool_call.arguments %}
            {%- set ns = namespace(lines=args is mapping) %}
            {%- if ns.lines %}
                {%- for key in args %}
                    {%- if not key or ':' in key or '\n' in key or key != key | trim %}
                        {%- set ns.lines = false %}
                    {%- endif %}
                {%- endfor %}
            {%- endif %}
            {%- if ns.lines %}
                {{- '<tool_call>\n' + tool_call.name }}
                {%- for key, value in args.items() %}
                    {{- '\n' + key + ': ' }}
                    {%- if value is string and value and value[0] not in '\"[{ \t\r' and value[-1] not in ' \t\r' and '\n' not in value and value not in ['true', 'false', 'null'] and not (value[0] in '-0123456789' and (value | float(none)) is not none) %}
                        {{- value }}
                    {%- else %}
                        {{- value | tojson }}
                    {%- endif %}
                {%- endfor %}
                {{- '\n</tool_call>' }}
            {%- else %}
                {{- '<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
                {%- if args is string %}
                    {{- args }}
                {%- else %}
                    {{- args | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endif %}
""" + _ASSISTANT_CLOSE_JINJA
_HERMES_INTRO_JINJA = (
    "        {{- '# Tools\\n\\nYou can call the functions below. To call one, reply with a JSON object inside "
    "<tool_call></tool_call> tags:\\n' }}\n"
    "        {{- '<tool_call>\\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call>\\n\\nFunctions' }}\n"
)
assert _HERMES_INTRO_JINJA in _CHATML_HEAD_JINJA
CHATML_KV_CHAT_TEMPLATE = (
    _CHATML_HEAD_JINJA.replace(_HERMES_INTRO_JINJA, "        {{- " + json.dumps(_KV_TOOLS_INTRO) + " }}\n")
    + _COMPACT_LISTING_JINJA + _CHATML_TAIL_JINJA.replace(_HERMES_ASSISTANT_JINJA, _KV_ASSISTANT_JINJA)
)


# ----------------------------------------------------------------------------- registry

# Hermes templates (qwen, chatml) stop at the end of the turn, not at </tool_call>: a turn may hold
# several parallel calls, and stopping after the first would lose the rest. Their calls always
# end the turn, so <|im_end|> is the end of a tool call too (as in Qwen2.5's generation_config).
TEMPLATES: dict[str, Template] = {
    "qwen": Template("qwen", QWEN_CHAT_TEMPLATE, ("<|im_end|>",), "<|im_end|>", _render_qwen),
    "llama3": Template("llama3", LLAMA3_CHAT_TEMPLATE, ("<|eot_id|>", "<|eom_id|>"), "<|eot_id|>", _render_llama3),
    "react": Template("react", REACT_CHAT_TEMPLATE, ("Observation:",), "<|im_end|>", _render_react),
    "chatml": Template("chatml", CHATML_CHAT_TEMPLATE, ("<|im_end|>",), "<|im_end|>", _render_chatml),
    "chatml_compact": Template("chatml_compact", CHATML_COMPACT_CHAT_TEMPLATE, ("<|im_end|>",), "<|im_end|>",
                               _render_chatml_compact),
    "chatml_kv": Template("chatml_kv", CHATML_KV_CHAT_TEMPLATE, ("<|im_end|>",), "<|im_end|>", _render_chatml_kv),
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; valid names: {', '.join(TEMPLATES)}") from None
