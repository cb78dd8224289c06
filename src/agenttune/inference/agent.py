"""The tool-use loop: generate a turn, read its calls, run the tools, show the model the results.

Everything the model can get wrong becomes an observation it sees on the next turn, never an
exception: a turn whose call cannot be read, an unknown tool, arguments that fail the tool's JSON
schema, a tool that raises. The loop ends at a turn without calls (the final answer) or after
``max_turns`` model turns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

from agenttune.data.schema import Conversation, Message, ToolCall
from agenttune.inference.parsing import Reply, parse_reply
from agenttune.tools import Tool, ToolError


@dataclass
class Event:
    """One thing that happened, for printing the trajectory as it unfolds."""

    kind: str  # "assistant", "call", "observation", "error", "final"
    text: str


@dataclass
class AgentResult:
    conversation: Conversation
    """The whole trajectory: what to save as a training record."""
    final_answer: str | None
    turns: int
    stopped: str
    """final (the model answered) or max_turns."""
    events: list[Event] = field(default_factory=list)


def new_conversation(question: str, tools: dict[str, Tool], system: str | None) -> Conversation:
    messages = ([Message("system", system)] if system else []) + [Message("user", question)]
    return Conversation(messages, tools=[t.schema for t in tools.values()], origin="agent")


def run_tool(call: ToolCall, tools: dict[str, Tool]) -> tuple[str, bool]:
    """(observation, ok) for one call."""
    tool = tools.get(call.name)
    if tool is None:
        return f"Error: unknown tool {call.name!r}. Available tools: {', '.join(sorted(tools))}.", False
    try:
        return tool(json.loads(call.arguments)), True
    except ToolError as err:
        return f"Error: {err}", False


def assistant_message(reply: Reply, template: str) -> Message:
    """The turn as history. A turn that could not be read keeps its text as content."""
    if template == "react":  # keep the exact step text, so the next prompt shows what the model wrote
        return Message("assistant", reply.content if reply.ok else reply.text, list(reply.tool_calls), raw=reply.text)
    if not reply.ok:
        return Message("assistant", reply.text)
    return Message("assistant", reply.content, list(reply.tool_calls), reasoning=reply.reasoning)


def run_agent(
    respond: Callable[[Conversation], str],
    conv: Conversation,
    tools: dict[str, Tool],
    template: str,
    max_turns: int,
    on_event: Callable[[Event], None] = lambda event: None,
) -> AgentResult:
    """Drive ``respond`` (the model, or a script in tests) until it answers."""
    events: list[Event] = []

    def emit(kind: str, text: str) -> None:
        events.append(Event(kind, text))
        on_event(events[-1])

    for turn in range(1, max_turns + 1):
        text = respond(conv)
        reply = parse_reply(template, text)
        if not reply.ok:
            # Keep what the model wrote and answer it with the parse error, as a tool result.
            conv.messages.append(assistant_message(reply, template))
            conv.messages.append(Message("tool", f"Error: {reply.error}. Write the call exactly in the format "
                                                 "the system prompt shows."))
            emit("error", reply.error)
            continue
        conv.messages.append(assistant_message(reply, template))
        if not reply.tool_calls:
            answer = reply.final_answer if reply.final_answer is not None else reply.content
            emit("final", answer)
            return AgentResult(conv, answer, turn, "final", events)
        if reply.content:
            emit("assistant", reply.content)
        for call in reply.tool_calls:
            emit("call", f"{call.name}({call.arguments})")
            observation, ok = run_tool(call, tools)
            conv.messages.append(Message("tool", observation, name=call.name))
            emit("observation" if ok else "error", observation)
    return AgentResult(conv, None, max_turns, "max_turns", events)
