"""The one place that decides what is trained: Conversation -> input_ids, labels, weights.

1. The template renders the conversation into labelled segments (``templates.py``).
2. Each segment gets a weight from the :class:`SupervisionConfig` (:func:`segment_weight`).
3. The whole text is tokenized once, exactly as at inference, and each token takes the
   minimum weight of the characters it covers.
4. Over-long samples are dropped or cut back to whole turns; a sample with no trained
   token is an error, never a silent all-masked row.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace

import numpy as np

from agenttune.data.options import SupervisionConfig
from agenttune.data.schema import Conversation, DataError
from agenttune.data.templates import HEADER, Segment, Template

IGNORE_INDEX = -100

_REACT_SCALE = {"action": 2.0, "action_input": 2.0, "obs_marker": 2.0, "thought": 1.0, "final_answer": 1.0}
_HERMES_SCALE = {"tool_call": 2.0}
_SCALES = {"default": {}, "react": _REACT_SCALE, "hermes": _HERMES_SCALE}


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    """Aligned with input_ids (not shifted); IGNORE_INDEX where the weight is 0."""
    weights: list[float]
    source: str
    """``agent`` or ``general``: which part of the loss the tokens join."""
    num_trained: int
    truncated: bool


# ----------------------------------------------------------------------------- weights per segment


def last_user_index(conv: Conversation) -> int:
    return max((i for i, m in enumerate(conv.messages) if m.role == "user"), default=-1)


def drop_history_reasoning(conv: Conversation) -> Conversation:
    """Reasoning of assistant messages before the last user message is left out (Qwen3 style)."""
    last_user = last_user_index(conv)
    if not any(m.reasoning for m in conv.messages[:last_user]):
        return conv
    messages = [
        replace(m, reasoning=None) if i < last_user and m.role == "assistant" else m
        for i, m in enumerate(conv.messages)
    ]
    return replace(conv, messages=messages)


def segment_weight(seg: Segment, conv: Conversation, sup: SupervisionConfig, last_user: int) -> float:
    if seg.kind == HEADER:
        return 0.0
    msg = conv.messages[seg.msg_index]
    if seg.kind == "observation":
        # A tool message's own weight may train its result; an observation pasted inside
        # assistant text (ReAct) never inherits the assistant's weight.
        if msg.role == "tool" and msg.weight is not None:
            return msg.weight
        return sup.observation_weight
    if msg.weight is not None:
        return msg.weight
    if seg.role == "assistant":
        if sup.train_on == "last_assistant" and seg.msg_index < last_user:
            return 0.0
        return _SCALES[sup.loss_scale].get(seg.kind, 1.0)
    return 1.0 if sup.train_on == "all" else 0.0  # system and user text


def _render_weighted(conv: Conversation, template: Template, sup: SupervisionConfig):
    if not sup.reasoning_in_history:
        conv = drop_history_reasoning(conv)
    segments = template.render(conv)
    last_user = last_user_index(conv)
    return segments, [segment_weight(s, conv, sup, last_user) for s in segments]


def weighted_segments(conv: Conversation, template: Template, sup: SupervisionConfig) -> list[tuple[str, float]]:
    """Per-character supervision as ``(text, weight)`` pieces; the texts concatenate to the
    rendered conversation. This is what ``inspect --json`` shows."""
    segments, weights = _render_weighted(conv, template, sup)
    return [(s.text, w) for s, w in zip(segments, weights)]


# ----------------------------------------------------------------------------- weights per token


def token_weights(offsets: np.ndarray, seg_ends: np.ndarray, seg_weights: np.ndarray) -> np.ndarray:
    """Weight of each token = the minimum weight over the characters it covers.

    offsets: (T, 2) char spans of the tokens; seg_ends: (S,) exclusive end char of each
    segment, increasing; seg_weights: (S,). Returns (T,) float weights.

    Taking the minimum means a token that merges trained text with untrained text (say the
    end of a tool result with the next word of the reply) is never trained: training it would
    teach the model to produce environment output. Zero-width tokens (some tokenizers give
    special tokens empty spans) take the weight at their start character.
    """
    if len(offsets) == 0:
        return np.zeros(0, dtype=np.float64)
    starts, ends = offsets[:, 0], offsets[:, 1]
    last_char = np.where(ends > starts, ends - 1, starts)
    n_seg = len(seg_ends)
    # searchsorted(..., "right") maps a char position to the segment that contains it.
    first = np.minimum(np.searchsorted(seg_ends, starts, side="right"), n_seg - 1)
    last = np.minimum(np.searchsorted(seg_ends, last_char, side="right"), n_seg - 1)
    weights = seg_weights[first].astype(np.float64)
    for t in np.nonzero(last > first)[0]:  # the few tokens that straddle a segment boundary
        weights[t] = seg_weights[first[t] : last[t] + 1].min()
    return weights


def turn_start_chars(segments: list[Segment], seg_weights: list[float]) -> list[int]:
    """Char position where each assistant message's trained text begins (after its header)."""
    starts, seen, pos = [], set(), 0
    for seg, w in zip(segments, seg_weights):
        if seg.role == "assistant" and seg.kind not in (HEADER, "observation") and w > 0 and seg.msg_index not in seen:
            seen.add(seg.msg_index)
            starts.append(pos)
        pos += len(seg.text)
    return starts


CALL_KINDS = ("tool_call", "action_input")
"""Segment kinds that end a tool call: a Hermes/Llama call, or ReAct's Action Input."""


def after_call_chars(segments: list[Segment], seg_weights: list[float]) -> list[int]:
    """Char position right after each trained tool call of an assistant message, where the text
    that follows is still that message's (another call, or the end of the turn)."""
    ends, pos = [], 0
    for k, (seg, w) in enumerate(zip(segments, seg_weights)):
        pos += len(seg.text)
        if seg.role == "assistant" and seg.kind in CALL_KINDS and w > 0:
            after = segments[k + 1] if k + 1 < len(segments) else None
            if after is not None and after.msg_index == seg.msg_index and after.kind != HEADER:
                ends.append(pos)
    return ends


NAME_KINDS = ("tool_call", "action")
"""Segment kinds that hold a call's function name: a Hermes/Llama call, or ReAct's Action line."""


def call_name_spans(segments: list[Segment], seg_weights: list[float], conv: Conversation) -> list[tuple[int, int]]:
    """Char spans of the function name inside each trained tool-call segment: the first place
    in the segment where one of its message's call names is written."""
    spans, pos = [], 0
    for seg, w in zip(segments, seg_weights):
        if seg.role == "assistant" and seg.kind in NAME_KINDS and w > 0:
            names = [c.name for c in conv.messages[seg.msg_index].tool_calls or []]
            found = [(at, -len(n)) for n in names if (at := seg.text.find(n)) >= 0]
            if found:  # the earliest; of two names starting there ("search", "search_products") the longer
                at, minus_len = min(found)
                spans.append((pos + at, pos + at - minus_len))
        pos += len(seg.text)
    return spans


def supervised_weights(offsets: np.ndarray, segments: list[Segment], seg_weights: list[float],
                       sup: SupervisionConfig, conv: Conversation) -> np.ndarray:
    """Per-token weights of a rendered conversation: :func:`token_weights`, then the first
    token of each assistant turn scaled by ``sup.first_token_weight``, the first token after
    each tool call by ``sup.after_call_weight``, and the tokens of each call's function name
    (:func:`call_name_spans` of ``conv``, whose rendering ``segments`` is) by ``sup.name_weight``."""
    weights = token_weights(offsets, *_segment_arrays(segments, seg_weights))
    if not len(offsets):
        return weights
    ends = offsets[:, 1]
    for factor, chars in ((sup.first_token_weight, turn_start_chars), (sup.after_call_weight, after_call_chars)):
        if factor == 1.0:
            continue
        for char in chars(segments, seg_weights):
            t = int(np.searchsorted(ends, char, side="right"))  # the first token that ends past it
            if t < len(weights) and weights[t] > 0:
                weights[t] *= factor
    if sup.name_weight != 1.0:
        starts = offsets[:, 0]
        for a, b in call_name_spans(segments, seg_weights, conv):
            inside = (ends > a) & (starts < b) & (weights > 0)
            weights[inside] *= sup.name_weight
    return weights


def _tokenize(tokenizer, texts: list[str]) -> list[tuple[list[int], np.ndarray]]:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("encode needs a fast (Rust) tokenizer for character offsets; "
                         "load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
    # add_special_tokens=False: the template already wrote every special token, and this is
    # how inference servers tokenize a rendered chat, so training ids equal serving ids.
    # The Rust backend directly: same ids and offsets as tokenizer(...), without converting
    # every encoding into Python dicts first (that conversion was 40% of encode time).
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return [(e.ids, np.array(e.offsets, dtype=np.int64).reshape(-1, 2)) for e in encodings]


def _segment_arrays(segments: list[Segment], weights: list[float]) -> tuple[np.ndarray, np.ndarray]:
    ends = np.cumsum([len(s.text) for s in segments], dtype=np.int64)
    return ends, np.asarray(weights, dtype=np.float64)


# ----------------------------------------------------------------------------- encode


def _build(ids: list[int], weights: np.ndarray, source: str, truncated: bool) -> Encoded:
    trained = weights > 0
    labels = np.where(trained, np.asarray(ids, dtype=np.int64), IGNORE_INDEX)
    return Encoded(
        input_ids=list(ids),
        labels=labels.tolist(),
        weights=weights.tolist(),
        source=source,
        num_trained=int(trained.sum()),
        truncated=truncated,
    )


def _no_trained_tokens(conv: Conversation, sup: SupervisionConfig) -> DataError:
    if sup.train_on == "last_assistant":
        hint = "train_on=last_assistant trains only assistant messages after the last user message; add a reply"
    else:
        hint = "add an assistant reply, or check message weights (weight=0 masks a message) and train_on"
    return DataError(conv.origin, "no token of this sample would be trained", hint=hint, kind="no_trained_tokens")


def _too_long(conv: Conversation, n_tokens: int, sup: SupervisionConfig) -> DataError:
    hint = "raise data.supervision.max_length"
    if sup.truncation == "drop":
        hint += " or set truncation=keep_turns to keep the leading turns"
    return DataError(conv.origin, f"{n_tokens} tokens exceed max_length={sup.max_length}",
                     hint=hint, kind="too_long")


def _finish(conv, segments, seg_weights, ids, offsets, tokenizer, template, sup) -> Encoded:
    weights = supervised_weights(offsets, segments, seg_weights, sup, conv)
    if len(ids) > sup.max_length:
        if sup.truncation == "drop":
            raise _too_long(conv, len(ids), sup)
        return _keep_turns(conv, segments, offsets, tokenizer, template, sup)
    if not (weights > 0).any():
        raise _no_trained_tokens(conv, sup)
    return _build(ids, weights, conv.source, truncated=False)


def encode(conv: Conversation, tokenizer, template: Template, sup: SupervisionConfig) -> Encoded:
    """Tokenize one conversation with its per-token loss weights.

    Raises DataError (kind ``too_long`` or ``no_trained_tokens``, or a template's own
    complaint) naming ``conv.origin``.
    """
    segments, seg_weights = _render_weighted(conv, template, sup)
    [(ids, offsets)] = _tokenize(tokenizer, ["".join(s.text for s in segments)])
    return _finish(conv, segments, seg_weights, ids, offsets, tokenizer, template, sup)


def encode_batch(convs: list[Conversation], tokenizer, template: Template,
                 sup: SupervisionConfig) -> list[Encoded | DataError]:
    """:func:`encode` over many conversations with one batched tokenizer call.

    A bad record does not stop the batch: its slot holds the DataError, for the caller to
    raise or count (``data.on_error``).
    """
    results: list[Encoded | DataError | None] = [None] * len(convs)
    rendered = []  # (index, segments, weights)
    for i, conv in enumerate(convs):
        try:
            rendered.append((i, *_render_weighted(conv, template, sup)))
        except DataError as err:
            results[i] = err
    texts = ["".join(s.text for s in segments) for _, segments, _ in rendered]
    for (i, segments, seg_weights), (ids, offsets) in zip(rendered, _tokenize(tokenizer, texts)):
        try:
            results[i] = _finish(convs[i], segments, seg_weights, ids, offsets, tokenizer, template, sup)
        except DataError as err:
            results[i] = err
    return results


def _keep_turns(conv: Conversation, segments: list[Segment], offsets: np.ndarray, tokenizer,
                template: Template, sup: SupervisionConfig) -> Encoded:
    """Longest prefix of whole turns that fits and still trains something.

    A cut falls after an assistant message that ends its turn (the next message is a user or
    system message), so no tool call loses its result and no ReAct turn is closed early. The
    prefix is rendered and tokenized again rather than sliced, so its ids are exactly what the
    template produces for that shorter conversation.
    """
    msgs = conv.messages
    # Char where each message's rendering starts, to skip prefixes that cannot fit.
    msg_start: dict[int, int] = {}
    pos = 0
    for seg in segments:
        if seg.msg_index is not None:
            msg_start.setdefault(seg.msg_index, pos)
        pos += len(seg.text)
    token_starts = offsets[:, 0].tolist()
    for k in range(len(msgs) - 1, 0, -1):
        if msgs[k - 1].role != "assistant" or msgs[k].role not in ("user", "system"):
            continue
        # Tokens before message k in the full rendering: a lower bound on the prefix length.
        if bisect.bisect_left(token_starts, msg_start.get(k, pos)) > sup.max_length:
            continue
        prefix = replace(conv, messages=msgs[:k])
        p_segments, p_weights = _render_weighted(prefix, template, sup)
        [(ids, p_offsets)] = _tokenize(tokenizer, ["".join(s.text for s in p_segments)])
        if len(ids) > sup.max_length:
            continue
        weights = supervised_weights(p_offsets, p_segments, p_weights, sup, prefix)
        if (weights > 0).any():
            return _build(ids, weights, conv.source, truncated=True)
    raise _too_long(conv, len(offsets), sup)
