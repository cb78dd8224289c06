"""``mode=predict``: generate every assistant turn of an eval file from its gold history and
score it (see ``metrics.py`` for the step kinds and metric definitions)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from agenttune.data.pipeline import resolve_path
from agenttune.data.readers import read_file
from agenttune.data.schema import Conversation, DataError, ToolCall
from agenttune.inference.config import PredictConfig
from agenttune.inference.generate import Generator
from agenttune.inference.metrics import StepScore, aggregate, score_step
from agenttune.inference.parsing import parse_reply
from agenttune.storage import SaveError, free_space_line


@dataclass
class Step:
    origin: str
    index: int
    """Index of the assistant message in the conversation."""
    kind: str  # call, final, general
    prompt: str
    gold_calls: list[ToolCall]
    gold_text: str


class EvalDataError(ValueError):
    """Bad records in predict.input, listed with their file:line (at most 20)."""

    def __init__(self, errors: list[DataError]):
        lines = [f"{len(errors)} bad record(s) in predict.input:"] + [f"  {e}" for e in errors[:20]]
        if len(errors) > 20:
            lines.append(f"  ... and {len(errors) - 20} more")
        lines.append("Fix them (python -m agenttune.data.inspect FILE shows how a record reads) and run again.")
        super().__init__("\n".join(lines))


def load_eval(cfg: PredictConfig) -> list[Conversation]:
    """Every record of the eval files; bad records stop the run with their file:line, as in training."""
    convs, errors = [], []
    for spec in cfg.input:
        for path in resolve_path(spec):  # pkg://, synth:// and directories as in training
            if not path.is_file():
                raise FileNotFoundError(f"predict.input: {spec} does not exist")
            items = list(read_file(path, cfg.format, cfg.source or "agent"))
            errors += [item for item in items if isinstance(item, DataError)]
            good = [item for item in items if not isinstance(item, DataError)]
            convs += good[: cfg.limit] if cfg.limit else good
    if errors:
        raise EvalDataError(errors)
    if cfg.source is None:  # a record that declares no tools is general chat
        for conv in convs:
            conv.source = "agent" if conv.tools else "general"
    return convs


def steps_of(conv: Conversation, generator: Generator) -> list[Step]:
    steps = []
    for i, message in enumerate(conv.messages):
        if message.role != "assistant":
            continue
        if conv.source == "general":
            kind = "general"
        else:
            kind = "call" if message.tool_calls else "final"
        history = Conversation(conv.messages[:i], conv.tools, conv.source, conv.origin, conv.meta)
        steps.append(Step(conv.origin, i, kind, generator.prompt(history), message.tool_calls, message.content))
    return steps


def _calls(calls: list[ToolCall]) -> list[dict]:
    return [{"name": c.name, "arguments": json.loads(c.arguments)} for c in calls]


def predict(generator: Generator, convs: list[Conversation], batch_size: int, label: str = "predict") -> tuple[list[dict], dict]:
    """(rows of predictions.jsonl, metrics)."""
    steps = [step for conv in convs for step in steps_of(conv, generator)]
    # Longest prompts first, batched by length: little padding, and memory trouble shows up at once.
    order = sorted(range(len(steps)), key=lambda k: -len(steps[k].prompt))
    completions = [None] * len(steps)
    with tqdm(total=len(steps), desc=label, unit="step", dynamic_ncols=True) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for k, completion in zip(chunk, generator.complete([steps[k].prompt for k in chunk])):
                completions[k] = completion
            bar.update(len(chunk))
    rows, scores = [], []
    for step, completion in zip(steps, completions):
        reply = parse_reply(generator.template.name, completion.text)
        score: StepScore = score_step(step.kind, reply, step.gold_calls, step.gold_text)
        scores.append(score)
        rows.append({
            "origin": step.origin, "message_index": step.index, "kind": step.kind,
            "reference": {"content": step.gold_text, "tool_calls": _calls(step.gold_calls)},
            "prediction": {"text": completion.text, "content": reply.content, "tool_calls": _calls(reply.tool_calls),
                           "final_answer": reply.final_answer, "error": reply.error,
                           "finish_reason": completion.finish_reason},
            "score": score.as_dict(),
        })
    metrics = aggregate(scores)
    metrics["records"] = len(convs)
    return rows, metrics


def write_predictions(out_dir: Path, rows: list[dict], metrics: dict, suffix: str = "") -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / f"predictions{suffix}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        (out_dir / f"metrics{suffix}.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False) + "\n")
    except OSError as e:
        raise SaveError(f"could not write the predictions to {out_dir}: {e}. {free_space_line(out_dir)}; the "
                        "metrics were printed above. Free space, or set predict.output_dir to another disk") from e


def read_metrics(path: str) -> dict:
    """A metrics.json, or the predict output dir that holds one."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.json"
    if not p.is_file():
        raise FileNotFoundError(f"predict.compare={path}: no metrics.json there (run mode=predict first)")
    return json.loads(p.read_text())


def sampling_info(generator: Generator) -> dict:
    return asdict(generator.sampling)
