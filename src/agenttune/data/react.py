"""ReAct text: splitting traces at observations and parsing actions.

Used by the readers (ms-agent assistant turns, FireAct traces) and by inference, which
parses what the model emits before ``Observation:`` with the same functions.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

from .schema import ToolCall, canonical_json

OBSERVATION = "Observation:"
# A keyword line that ends an observation span. The observation is environment output:
# everything after the marker up to the next line the model itself would write.
_NEXT_STEP = re.compile(r"^(?:Thought:|Action:|Final Answer:)", re.M)
_OBS_MARKER = re.compile(r"^Observation:", re.M)
_ACTION = re.compile(r"^Action:[ \t]*(.*)$", re.M)
_ACTION_INPUT = re.compile(r"^Action Input:[ \t]*", re.M)
_BRACKET = re.compile(r"^([\w\-\.]+)\[(.*)\]\s*$", re.S)
_FINAL = re.compile(r"^Final Answer:[ \t]*", re.M)
_THOUGHT = re.compile(r"^Thought:[ \t]*", re.M)


class ReActError(ValueError):
    """A ReAct trace that cannot be parsed; ``kind`` matches DataError kinds."""

    def __init__(self, reason: str, kind: str):
        super().__init__(reason)
        self.kind = kind


def has_react_trace(text: str) -> bool:
    """An Action line and an Observation line: a trace with environment output inside."""
    return bool(_ACTION.search(text)) and bool(_OBS_MARKER.search(text))


def has_react_keywords(text: str) -> bool:
    """Any Action or Observation line: text that must go through the ReAct parser."""
    return bool(_ACTION.search(text)) or bool(_OBS_MARKER.search(text))


def split_observations(text: str) -> tuple[list[str], list[str]]:
    """Split ``A0 Observation:O1 A1 Observation:O2 ... An`` into steps ``[A0..An]`` and
    observations ``[O1..On]``. Concatenating ``A0 + "Observation:" + O1 + A1 ...`` gives
    ``text`` back exactly; observations keep their leading space and trailing newline."""
    steps, observations = [], []
    pos = 0
    for marker in _OBS_MARKER.finditer(text):
        if marker.start() < pos:  # marker inside an observation that was already consumed
            continue
        steps.append(text[pos : marker.start()])
        end_match = _NEXT_STEP.search(text, marker.end())
        end = end_match.start() if end_match else len(text)
        observations.append(text[marker.end() : end])
        pos = end
    steps.append(text[pos:])
    return steps, observations


def parse_arguments(text: str, *, allow_python: bool) -> str:
    """Arguments text -> canonical JSON of an object. ms-agent often writes Python dict
    literals (single quotes); those are read with ``ast.literal_eval``, never ``eval``."""
    text = text.strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if not allow_python:
            raise ReActError(f"arguments are not valid JSON ({err.msg}): {text[:80]!r}", "bad_arguments")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise ReActError(
                f"Action Input is neither JSON nor a Python literal: {text[:80]!r}", "bad_arguments"
            ) from None
    if not isinstance(value, dict):
        raise ReActError(
            f"arguments must be a JSON object, got {type(value).__name__}: {text[:80]!r}", "bad_arguments"
        )
    try:
        return canonical_json(value)
    except (TypeError, ValueError):  # e.g. a Python set or bytes literal
        raise ReActError(f"arguments are not JSON-serialisable: {text[:80]!r}", "bad_arguments") from None


@dataclass
class Step:
    """One model-written ReAct step (the text between observations)."""

    thought: str | None
    call: ToolCall | None
    final_answer: str | None
    text: str


def _thought(head: str) -> str | None:
    m = _THOUGHT.search(head)
    if m:
        return head[m.end() :].strip() or None
    return head.strip() or None


def parse_step(text: str) -> Step:
    """Parse ``[Thought: ...] Action: name / Action Input: {...}`` or ``Action: name[arg]``
    (FireAct) or ``[Thought: ...] Final Answer: ...``. Text without any keyword is a plain reply."""
    action = _ACTION.search(text)
    if action:
        head, spec = text[: action.start()], action.group(1).strip()
        bracket = _BRACKET.match(spec)
        if bracket:  # FireAct style: search[query]
            name, arguments = bracket.group(1), canonical_json({"input": bracket.group(2)})
            raw = text[action.start() :].rstrip("\n")
        else:
            ai = _ACTION_INPUT.search(text, action.end())
            if not spec:
                raise ReActError("`Action:` names no tool", "bad_arguments")
            if not ai:
                raise ReActError(f"`Action: {spec}` has no `Action Input:` line", "bad_arguments")
            name = spec
            arguments = parse_arguments(text[ai.end() :], allow_python=True)
            raw = text[action.start() :].rstrip("\n")
        return Step(_thought(head), ToolCall(name=name, arguments=arguments, raw=raw), None, text)
    final = _FINAL.search(text)
    if final:
        return Step(_thought(text[: final.start()]), None, text[final.end() :].strip(), text)
    return Step(None, None, None, text)
