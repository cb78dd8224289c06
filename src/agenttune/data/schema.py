"""The one conversation type every reader produces and every template consumes.

Readers (``readers.py``) turn each input format into a :class:`Conversation`;
templates (``templates.py``) turn a conversation into ``input_ids``, ``labels``
and per-token ``weights``. Nothing else decides what the model learns from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
SOURCES = ("agent", "general")
SOURCE_IDS = {name: i for i, name in enumerate(SOURCES)}  # the `source` column: 0 agent, 1 general


class DataError(ValueError):
    """A problem with one input record, phrased for the person who owns the file.

    ``origin`` is ``"path:line"`` for line-oriented files or ``"path#index"`` for
    records inside a JSON list, so the user can jump straight to the record.
    """

    def __init__(self, origin: str, reason: str, hint: str = "", kind: str = "invalid"):
        self.origin, self.reason, self.hint, self.kind = origin, reason, hint, kind
        text = f"{origin}: {reason}"
        if hint:
            text += f" ({hint})"
        super().__init__(text)


class DataErrors(Exception):
    """Bad records found while loading, listed for the user (the first ``len(errors)`` of ``total``)."""

    def __init__(self, errors: list[DataError], total: int):
        self.errors, self.total = errors, total
        lines = [f"{total} bad record(s) in the training data:"] + [f"  {e}" for e in errors]
        if total > len(errors):
            lines.append(f"  ... and {total - len(errors)} more")
        lines.append("Fix them, or set data.on_error=skip to drop them (they are then counted and "
                     "written to data.rejects_file).")
        super().__init__("\n".join(lines))


@dataclass
class ToolCall:
    name: str
    arguments: str
    """Canonical JSON text of the arguments object (``json.dumps(..., ensure_ascii=False)``).
    Kept as a string so Arrow never merges argument keys across rows."""
    raw: str | None = None
    """The call exactly as the source wrote it (ms-agent ``Action:``/``Action Input:`` text).
    The ``react`` template reproduces it byte for byte."""
    id: str | None = None

    def args(self) -> dict[str, Any]:
        return json.loads(self.arguments)


@dataclass
class Message:
    role: str
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning: str | None = None
    weight: float | None = None
    """Loss weight for every trainable token of this message; overrides
    ``train_on``, ``loss_scale`` and ``observation_weight``."""
    raw: str | None = None
    """Exact source text of a ReAct step (assistant) or observation (tool), kept so the
    ``react`` template renders ms-agent records byte for byte."""
    tool_call_id: str | None = None
    name: str | None = None


@dataclass
class Conversation:
    messages: list[Message]
    tools: list[dict] = field(default_factory=list)
    """Function schemas: ``{"name", "description", "parameters"}``."""
    source: str = "agent"
    origin: str = ""
    meta: dict = field(default_factory=dict)

    def tool_names(self) -> set[str]:
        return {t["name"] for t in self.tools}

    # Arrow-friendly form: nested JSON-ish payloads (tools, arguments, meta) are strings,
    # because Arrow unifies struct keys across rows and would invent missing keys.
    def to_row(self) -> dict:
        return {
            "messages": [
                {
                    "role": m.role,
                    "content": m.content,
                    "tool_calls": [
                        {"name": c.name, "arguments": c.arguments, "raw": c.raw, "id": c.id}
                        for c in m.tool_calls
                    ],
                    "reasoning": m.reasoning,
                    "weight": m.weight,
                    "raw": m.raw,
                    "tool_call_id": m.tool_call_id,
                    "name": m.name,
                }
                for m in self.messages
            ],
            "tools": json.dumps(self.tools, ensure_ascii=False),
            "source": self.source,
            "origin": self.origin,
            "meta": json.dumps(self.meta, ensure_ascii=False),
        }

    @classmethod
    def from_row(cls, row: dict) -> Conversation:
        messages = [
            Message(
                role=m["role"],
                content=m["content"],
                tool_calls=[ToolCall(**c) for c in m["tool_calls"]],
                reasoning=m["reasoning"],
                weight=m["weight"],
                raw=m["raw"],
                tool_call_id=m["tool_call_id"],
                name=m["name"],
            )
            for m in row["messages"]
        ]
        return cls(
            messages=messages,
            tools=json.loads(row["tools"]),
            source=row["source"],
            origin=row["origin"],
            meta=json.loads(row["meta"]),
        )


def to_openai_record(conv: Conversation) -> dict:
    """The conversation as an OpenAI ``messages`` + ``tools`` record (what ``read_openai``
    reads back): lossless for parallel calls, which ShareGPT's single observation turn is not."""
    messages = []
    for m in conv.messages:
        out: dict = {"role": m.role, "content": m.content}
        if m.reasoning:
            out["reasoning_content"] = m.reasoning
        if m.tool_calls:
            out["tool_calls"] = [
                {"type": "function", "function": {"name": c.name, "arguments": c.arguments},
                 **({"id": c.id} if c.id else {})}
                for c in m.tool_calls
            ]
        if m.tool_call_id:
            out["tool_call_id"] = m.tool_call_id
        if m.name:
            out["name"] = m.name
        messages.append(out)
    record: dict = {"messages": messages}
    if conv.tools:
        record["tools"] = [{"type": "function", "function": tool} for tool in conv.tools]
    return record


def canonical_json(value: Any) -> str:
    """The one JSON spelling used for arguments everywhere (training, parsing, metrics)."""
    return json.dumps(value, ensure_ascii=False)
