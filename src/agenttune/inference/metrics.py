"""Agent metrics over step-wise predictions.

An eval conversation is cut into steps, one per assistant turn: the prompt is the gold history
before the turn, the reference is the turn itself (teacher forcing, as in ToolBench/ms-swift
evaluation). Each step is one of:

- ``call``: the reference calls tools. Scored on format validity, tool names, exact arguments
  and argument key-value F1.
- ``final``: the reference answers in an agent conversation. Scored on format validity, exact
  match of the answer and ROUGE-L.
- ``general``: an assistant turn of a general (non-agent) conversation. ROUGE-L.

Definitions (all in [0, 1], over the steps of the named kind):

- format_validity (call + final steps): the turn has the form the step needs and it parses under
  the template's grammar: a call step yields at least one readable call (JSON, or ReAct's Action /
  Action Input) and no unreadable one; an answer step yields an answer (for react, a
  ``Final Answer:``). So a model that never calls tools scores 0 on call steps, not 1.
- tool_name_accuracy: the multiset of predicted tool names equals the reference's.
- argument_exact_match: the multiset of (name, arguments) pairs equals the reference's, with
  arguments compared as parsed JSON (key order and spacing do not matter).
- argument_kv_f1: micro F1 over (tool name, key, JSON value) triples of all call steps.
- final_answer_exact_match: predicted answer == reference after trimming and collapsing spaces.
- final_answer_rouge_l / general_rouge_l: mean ROUGE-L F1 (LCS of tokens). Tokens are lower-cased
  words, and each CJK character is its own token (rouge-score's default tokenizer drops CJK).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass

from agenttune.data.schema import ToolCall
from agenttune.inference.parsing import Reply

_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff]|[^\W_]+", re.UNICODE)
_SPACES = re.compile(r"\s+")


def rouge_tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 between two texts."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    # Longest common subsequence, one row at a time.
    previous = [0] * (len(ref) + 1)
    for p in pred:
        current = [0]
        for j, r in enumerate(ref, start=1):
            current.append(previous[j - 1] + 1 if p == r else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def normalize_answer(text: str) -> str:
    return _SPACES.sub(" ", text.strip())


def _call_key(call: ToolCall) -> tuple[str, str]:
    try:
        args = json.dumps(json.loads(call.arguments), sort_keys=True, ensure_ascii=False)
    except json.JSONDecodeError:
        args = call.arguments
    return call.name, args


def _kv_triples(calls: list[ToolCall]) -> Counter:
    triples: Counter = Counter()
    for call in calls:
        try:
            args = json.loads(call.arguments)
        except json.JSONDecodeError:
            continue
        if isinstance(args, dict):
            for key, value in args.items():
                triples[(call.name, key, json.dumps(value, sort_keys=True, ensure_ascii=False))] += 1
        if not args:  # a call without arguments still has a name to get right
            triples[(call.name, None, None)] += 1
    return triples


@dataclass
class StepScore:
    kind: str
    valid: bool | None = None
    name_match: bool | None = None
    args_match: bool | None = None
    kv_hits: int = 0
    kv_pred: int = 0
    kv_gold: int = 0
    answer_match: bool | None = None
    rouge_l: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def well_formed(prediction: Reply, kind: str) -> bool:
    if not prediction.ok:
        return False
    if kind == "call":
        return bool(prediction.tool_calls)
    return not prediction.tool_calls and prediction.final_answer is not None


def score_step(kind: str, prediction: Reply, gold_calls: list[ToolCall], gold_text: str) -> StepScore:
    if kind == "general":
        return StepScore(kind, rouge_l=rouge_l(prediction.content if prediction.ok else prediction.text, gold_text))
    if kind == "call":
        score = StepScore(kind, valid=well_formed(prediction, kind))
        score.name_match = Counter(c.name for c in prediction.tool_calls) == Counter(c.name for c in gold_calls)
        score.args_match = Counter(map(_call_key, prediction.tool_calls)) == Counter(map(_call_key, gold_calls))
        pred, gold = _kv_triples(prediction.tool_calls), _kv_triples(gold_calls)
        score.kv_hits, score.kv_pred, score.kv_gold = sum((pred & gold).values()), sum(pred.values()), sum(gold.values())
        return score
    # final: the prediction must answer (no call); its answer is compared with the reference
    answer = prediction.final_answer if (prediction.ok and not prediction.tool_calls) else None
    return StepScore(
        kind,
        valid=well_formed(prediction, kind),
        answer_match=answer is not None and normalize_answer(answer) == normalize_answer(gold_text),
        rouge_l=rouge_l(answer or "", gold_text),
    )


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def aggregate(scores: list[StepScore]) -> dict:
    calls = [s for s in scores if s.kind == "call"]
    finals = [s for s in scores if s.kind == "final"]
    general = [s for s in scores if s.kind == "general"]
    hits, n_pred, n_gold = (sum(getattr(s, k) for s in calls) for k in ("kv_hits", "kv_pred", "kv_gold"))
    precision = hits / n_pred if n_pred else 0.0
    recall = hits / n_gold if n_gold else 0.0
    return {
        "format_validity": _mean([s.valid for s in calls + finals]),
        "tool_name_accuracy": _mean([s.name_match for s in calls]),
        "argument_exact_match": _mean([s.args_match for s in calls]),
        "argument_kv_f1": (2 * precision * recall / (precision + recall) if precision + recall else 0.0) if calls else None,
        "final_answer_exact_match": _mean([s.answer_match for s in finals]),
        "final_answer_rouge_l": _mean([s.rouge_l for s in finals]),
        "general_rouge_l": _mean([s.rouge_l for s in general]),
        "steps": {"call": len(calls), "final": len(finals), "general": len(general)},
    }


METRIC_NAMES = ("format_validity", "tool_name_accuracy", "argument_exact_match", "argument_kv_f1",
                "final_answer_exact_match", "final_answer_rouge_l", "general_rouge_l")


def comparison_table(before: dict, after: dict, before_name: str = "before", after_name: str = "after") -> str:
    """A plain-text before/after table of the metrics present in either."""
    rows = [("metric", before_name, after_name, "change")]
    for name in METRIC_NAMES:
        b, a = before.get(name), after.get(name)
        if b is None and a is None:
            continue
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        change = "-" if a is None or b is None else f"{a - b:+.3f}"
        rows.append((name, fmt(b), fmt(a), change))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
